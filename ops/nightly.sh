#!/usr/bin/env bash
# carnumber nightly job, run once a night on the producer host (ops/systemd/ timer, or ops/cron/).
#
#   1. refuse to start while the fleet is stopped by a fatal error (that needs an operator);
#   2. resume runs parked because the call quota was spent (state quota_exhausted): the quota
#      window has reset since. Nothing else is resumed automatically (AUTO_RESUME_STATES).
#      Resume also finishes each source whose enqueue stopped early (the producer stops feeding
#      a held run) with the command recorded for it;
#   3. enqueue tonight's images as run RUN_ID, follow it to the end, compact it, retry its
#      retryable failures once, follow again, compact again, then `carnumber verify` it: every
#      image the producer enqueued must have exactly one outcome in the output; then print its
#      morning report (`carnumber report`);
#   4. the same for each run resumed in step 2 (its chunks were queued first: usually done).
#
# Settings come from the environment (systemd EnvironmentFile, or the crontab line):
#   SOURCE        required. Where tonight's images are: folder, archive, s3://, oss://, manifest.
#                 "{date}" in it is replaced by RUN_DATE, e.g. oss://cams/archive/{date}/
#   RUN_DATE      default: yesterday (the host's time zone; set TZ to change), YYYY-MM-DD
#   RUN_ID        default: RUN_DATE
#   ENQUEUE_ARGS  extra flags for `carnumber enqueue`, e.g. "--glob *.jpg"
#   CARNUMBER     the command, default "carnumber"; with Docker Compose:
#                 "docker compose -f /opt/carnumber/docker-compose.yml run --rm -T producer"
#   AUTO_RESUME_STATES  run states resumed without an operator, default "quota_exhausted"
#   FOLLOW_TIMEOUT      longest wait for a run to finish, default 20h (timeout(1) syntax)
#   FOLLOW_LOG_EVERY    log one progress line in this many (a line every 2 s), default 150
#   LOCK_FILE           default ${RUNTIME_DIRECTORY:-/tmp}/carnumber-nightly.lock
# plus the usual carnumber settings (REDIS_URL, credentials, CARNUMBER_*), which this script
# never prints.
#
# Exit codes:
#   0   the run (and every resumed run) is done, compacted and verified, retry round included
#   2   configuration error (missing SOURCE, bad setting, Redis unreachable)
#   3   the run is parked until the quota resets; the next night resumes it
#   4   the fleet is stopped or the run paused for another reason: an operator must act
#       (ops/README.md, "Resume after a stop")
#   5   the run did not finish within FOLLOW_TIMEOUT (workers down or too slow)
#   6   carnumber verify found images missing, parked, duplicated or unexpected: the log holds
#       its table; the runbook says what to do with each kind
#   75  another nightly job still holds the lock
#   other: the failing carnumber command's own exit code
set -euo pipefail

RUN_DATE="${RUN_DATE:-$(date -d yesterday +%F)}"
RUN_ID="${RUN_ID:-$RUN_DATE}"
AUTO_RESUME_STATES="${AUTO_RESUME_STATES:-quota_exhausted}"
FOLLOW_TIMEOUT="${FOLLOW_TIMEOUT:-20h}"
FOLLOW_LOG_EVERY="${FOLLOW_LOG_EVERY:-150}"
LOCK_FILE="${LOCK_FILE:-${RUNTIME_DIRECTORY:-/tmp}/carnumber-nightly.lock}"
read -r -a CN <<< "${CARNUMBER:-carnumber}"
read -r -a EXTRA <<< "${ENQUEUE_ARGS:-}"

log() { printf '%s nightly[%s]: %s\n' "$(date -u +%FT%TZ)" "$RUN_ID" "$*"; }
cn() { "${CN[@]}" "$@"; }

if [[ -z "${SOURCE:-}" ]]; then
  log "SOURCE is not set (where tonight's images are, e.g. oss://cams/archive/{date}/)"
  exit 2
fi
SOURCE="${SOURCE//\{date\}/$RUN_DATE}"

exec 9>"$LOCK_FILE"
if ! flock -n 9; then
  log "another nightly job holds $LOCK_FILE; not starting"
  exit 75
fi

# One metrics snapshot answers both questions below (and checks that Redis is reachable).
metrics_snapshot() {
  local rc=0
  METRICS="$(cn metrics --once --runs 200)" || rc=$?
  if [[ $rc -ne 0 ]]; then
    log "cannot read the fleet's state (carnumber metrics --once exited $rc: Redis down, or no monitor extra?)"
    exit 2
  fi
}

fleet_stop_codes() {
  sed -n 's/^carnumber_fleet_stopped{account="[^"]*",code="\([^"]*\)"} 1\.0$/\1/p' <<< "$METRICS"
}

runs_in_state() {
  sed -n "s/^carnumber_run_state{run_id=\"\\([^\"]*\\)\",state=\"$1\"} 1\\.0\$/\\1/p" <<< "$METRICS"
}

run_state() {
  cn status "$1" --json | sed -n 's/^ *"state": "\([^"]*\)".*/\1/p'
}

# Follow run $1 to its end, logging one line in FOLLOW_LOG_EVERY. Returns the nightly exit code.
follow() {
  local run="$1" rc=0 state
  timeout "$FOLLOW_TIMEOUT" "${CN[@]}" status "$run" --follow \
    | awk -v every="$FOLLOW_LOG_EVERY" '
        { last = $0; if ((NR - 1) % every == 0) { print; printed = NR } }
        END { if (NR && printed != NR) print last }' \
    | while IFS= read -r line; do log "$line"; done || rc=$?
  case $rc in
    0) return 0 ;;
    124) log "run $run not finished after $FOLLOW_TIMEOUT"; return 5 ;;
    3)
      state="$(run_state "$run")"
      if [[ "$state" == quota_exhausted ]]; then
        log "run $run paused: call quota spent; the next nightly job resumes it"
        return 3
      fi
      log "run $run paused in state '$state': an operator must act (ops/README.md, Resume after a stop)"
      return 4
      ;;
    *) log "carnumber status $run --follow exited $rc"; return "$rc" ;;
  esac
}

# Reconcile run $1's output with what the producer enqueued (after compaction), logging the
# table. Returns 6 on a mismatch, verify's own code when it could not check (2: bad input).
verify() {
  local run="$1" rc=0
  log "verifying run $run"
  cn verify "$run" | while IFS= read -r line; do log "$line"; done || rc=$?
  case $rc in
    0) return 0 ;;
    1) log "run $run: the output does not match what was enqueued (carnumber verify $run)"; return 6 ;;
    *) log "carnumber verify $run exited $rc"; return "$rc" ;;
  esac
}

# The morning summary of run $1 in the log; a failing report never changes the job's exit code.
report() {
  local run="$1"
  cn report "$run" | while IFS= read -r line; do log "$line"; done \
    || log "carnumber report $run failed (the run itself is done)"
}

# Compact finished run $1, retry its retryable failures once, follow and compact again.
finish() {
  local run="$1" retryable rc=0
  log "compacting run $run"
  cn compact "$run"
  retryable="$(cn retry-failures "$run" --dry-run \
    | sed -n 's/^run [^ ]*: \([0-9]*\) images with a retryable failure$/\1/p')"
  if [[ "${retryable:-0}" -gt 0 ]]; then
    log "retrying $retryable images of run $run with a retryable failure (one round)"
    cn retry-failures "$run"
    follow "$run" || rc=$?
    if [[ $rc -ne 0 ]]; then return "$rc"; fi
    log "compacting run $run after the retry round"
    cn compact "$run"
  fi
}

log "starting: source ${SOURCE%%\?*}"
metrics_snapshot
stops="$(fleet_stop_codes | paste -sd, -)"
if [[ -n "$stops" ]]; then
  log "fleet stopped by $stops: nothing enqueued; fix the cause, then carnumber resume RUN_ID"
  exit 4
fi

resumed=()
for state in $AUTO_RESUME_STATES; do
  for run in $(runs_in_state "$state"); do
    log "resuming run $run (state $state)"
    # --keep-stop: an automatic resume never lifts a fatal stop; only an operator does. Resume
    # publishes the parked chunks and finishes every enqueue that stopped early (the producer
    # stops feeding a held run; it is run again with its recorded command, skipping what it had
    # published).
    rc=0; cn resume "$run" --keep-stop || rc=$?
    if [[ "$run" == "$RUN_ID" ]]; then continue; fi  # enqueued again below
    if [[ $rc -eq 0 ]]; then
      resumed+=("$run")
    else
      log "resuming run $run exited $rc; what is left waits for an operator (carnumber status $run)"
    fi
  done
done

log "enqueueing"
# 3: the producer stopped early because the run is held (the quota spent, a pause): follow says why.
rc=0; cn enqueue "$SOURCE" --run "$RUN_ID" "${EXTRA[@]}" || rc=$?
if [[ $rc -ne 0 && $rc -ne 3 ]]; then exit "$rc"; fi
rc=0; follow "$RUN_ID" || rc=$?
if [[ $rc -ne 0 ]]; then exit "$rc"; fi
finish "$RUN_ID"
status=0
verify "$RUN_ID" || status=$?
report "$RUN_ID"

# Runs resumed above were published first, so they are usually done by now.
for run in "${resumed[@]}"; do
  rc=0; follow "$run" || rc=$?
  if [[ $rc -eq 0 ]]; then
    finish "$run"
    verify "$run" || rc=$?
    report "$run"
  fi
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
done
log "done"
exit "$status"
