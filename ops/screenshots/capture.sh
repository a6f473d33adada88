#!/usr/bin/env bash
# Screenshots for the README, from the real programs: Flower during a `carnumber demo` run (headless
# chromium), `carnumber status` captured from tmux (text, and a PNG rendered from its ANSI colours),
# and the run's `carnumber report`. Needs a Redis (db 11 is used and its carnumber-demo* keys
# deleted first), tmux, chromium, redis-cli. Usage: ops/screenshots/capture.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
export REDIS_URL=${CAPTURE_REDIS_URL:-redis://127.0.0.1:6379/11}
DB=${REDIS_URL##*/}
DEMO_ENV=("REDIS_URL=$REDIS_URL" CARNUMBER_KEY_PREFIX=carnumber-demo CARNUMBER_QUEUE=carnumber-demo
  CARNUMBER_QPS=10 ALIBABA_CLOUD_ACCESS_KEY_ID=demo CARNUMBER_PRICE_PER_1000_CALLS=1.5 CARNUMBER_RUN_DEADLINE=06:00)
OUT=${1:-/tmp/carnumber-shots}
mkdir -p "$OUT"
rm -rf "$OUT/demo"; redis-cli -n "$DB" --scan --pattern "carnumber-demo*" | xargs -r redis-cli -n "$DB" del > /dev/null
.venv/bin/carnumber demo --images 600 --qps 10 --recognizer replay --out "$OUT/demo" > "$OUT/demo.log" 2>&1 &
DEMO=$!
env "${DEMO_ENV[@]}" FLOWER_UNAUTHENTICATED_API=true .venv/bin/celery -A workers flower --port=5599 --address=127.0.0.1 \
  --tasks_columns=name,state,args,result,runtime,worker > "$OUT/flower.log" 2>&1 &
FLOWER=$!
for _ in $(seq 240); do
  RUN=$(redis-cli -n "$DB" zrevrange carnumber-demo:runs 0 0 2>/dev/null || true)
  if [[ -n "$RUN" ]] && [[ "$(redis-cli -n "$DB" hget "carnumber-demo:run:$RUN" images_written)" -gt 40 ]]; then break; fi
  sleep 0.5
done
echo "run $RUN"
tmux kill-session -t cnshot 2>/dev/null || true
tmux new-session -d -s cnshot -x 112 -y 15 "env ${DEMO_ENV[*]} .venv/bin/carnumber status $RUN; sleep 120"
sleep 16
curl -s "http://127.0.0.1:5599/api/workers?refresh=true&workername=demo@$(hostname)" > "$OUT/flower-workers.json" || true
TASK=$(curl -s "http://127.0.0.1:5599/api/tasks?limit=1&state=SUCCESS" | python3 -c 'import json,sys; print(next(iter(json.load(sys.stdin))))' || true)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,900 --virtual-time-budget=5000 \
  --screenshot="$OUT/flower-task.png" "http://127.0.0.1:5599/task/$TASK" 2>/dev/null || true
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,520 --virtual-time-budget=5000 \
  --screenshot="$OUT/flower-tasks.png" "http://127.0.0.1:5599/tasks" 2>/dev/null || true
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,440 --virtual-time-budget=5000 \
  --screenshot="$OUT/flower-workers.png" "http://127.0.0.1:5599/workers" 2>/dev/null || true
sleep 8
tmux capture-pane -p -e -t cnshot > "$OUT/status.ansi"
tmux capture-pane -p -t cnshot > "$OUT/status.txt"
env "${DEMO_ENV[@]}" .venv/bin/carnumber status "$RUN" --no-workers > "$OUT/status-line.txt" 2>&1 || true
wait $DEMO || true
sleep 2
env "${DEMO_ENV[@]}" CARNUMBER_OUTPUT="$OUT/demo"/output .venv/bin/carnumber report "$RUN" > "$OUT/report.txt" 2>&1 || true
env "${DEMO_ENV[@]}" CARNUMBER_OUTPUT="$OUT/demo"/output .venv/bin/carnumber report "$RUN" --json > "$OUT/report.json" 2>&1 || true
env "${DEMO_ENV[@]}" .venv/bin/carnumber status "$RUN" --follow --no-workers > "$OUT/status-follow.txt" 2>&1 || true
env "${DEMO_ENV[@]}" .venv/bin/carnumber status > "$OUT/status-list.txt" 2>&1 || true
tmux kill-session -t cnshot 2>/dev/null || true
kill $FLOWER || true
n=$(.venv/bin/python ops/screenshots/render_ansi.py "$OUT/status.ansi" "$OUT/status.html" 114)
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1000,$((n * 17 + 30)) \
  --screenshot="$OUT/status.png" "file://$OUT/status.html" 2>/dev/null || true
.venv/bin/python - "$OUT" <<'PY'
import sys
from PIL import Image
for name in ("flower-task", "flower-tasks", "flower-workers", "status"):
    path = f"{sys.argv[1]}/{name}.png"
    Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)  # small PNGs
PY
echo "done: $OUT"
