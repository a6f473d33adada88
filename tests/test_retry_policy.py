"""The one retry policy: backoff bounds, and the decision for every error class of the reference."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from workers.api.client import read_response
from workers.api.codes import api_error
from workers.config import Settings
from workers.errors import (
    ApiError,
    CircuitOpen,
    ConfigError,
    FleetStopped,
    ImageRejected,
    InputError,
    QuotaExhausted,
    TransportError,
    UnreadableAnswer,
)
from workers.retry import THROTTLED_WAIT_S, Decision, RetryPolicy, backoff, safe_message, service_ok

# (HTTP status, code) straight from shared/reference/recognize-car-number.md, "Errors".
RETRYABLE = [
    (400, "Throttling.User"),
    (429, "Throttling"),
    (400, "Throttling.Api"),
    (500, "InternalError"),
    (503, "ServiceUnavailable"),
    (503, "algorithmError"),
    (503, "AlgorithmTimeout"),
    (504, "ServiceTimeout"),
    (400, "imageTimeOut"),
]
BAD_INPUT = [
    (400, "IllegalImageUrl"),
    (400, "illegalImageUrl"),
    (400, "unmatchedImageType"),
    (400, "exceededImageUrlLength"),
    (400, "imageUrlOrBodyEmpty"),
    (400, "unsupportedEncodeImageUrl"),
    (400, "notSafeImageUrl"),
    (400, "MissingImageUrl"),
    (413, "exceededImageContent"),
    (415, "unsupportedImageFormat"),
    (416, "illegalImageSize"),
]
FATAL = [
    (400, "SignatureDoesNotMatch"),
    (400, "IncompleteSignature"),
    (400, "illegalSignature"),
    (400, "SignatureNonceUsed"),
    (400, "InvalidTimeStamp.Expired"),
    (404, "InvalidAccessKeyId.NotFound"),
    (400, "InvalidAccessKeyId.Inactive"),
    (400, "invalidStsToken"),
    (400, "MissingAccessKeyId"),
    (403, "Forbidden.RAM"),
    (401, "noPermission"),
    (401, "ocrServiceNotOpen"),
    (401, "OcrServiceExpired"),
]


def policy(**kw: object) -> RetryPolicy:
    args: dict[str, object] = {"base_s": 0.5, "cap_s": 30.0, "max_attempts": 6}
    args.update(kw)
    return RetryPolicy(**args, rng=random.Random(7))  # type: ignore[arg-type]


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_full_jitter_stays_under_the_exponential_ceiling_and_spreads_over_it() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(10.0, 0.25 * 2 ** (attempt - 1))
        draws = [backoff(attempt, base_s=0.25, cap_s=10.0, rng=rng) for _ in range(400)]
        assert all(0.0 <= d <= ceiling for d in draws)
        # Full jitter: the draws cover the whole range, not a band near the ceiling.
        assert min(draws) < 0.1 * ceiling
        assert max(draws) > 0.9 * ceiling


def test_backoff_is_capped_and_finite_for_huge_attempts() -> None:
    rng = random.Random(2)
    assert all(backoff(a, base_s=1.0, cap_s=5.0, rng=rng) <= 5.0 for a in (30, 1_000, 100_000))


def test_backoff_is_reproducible_with_a_seeded_rng_and_rejects_attempt_zero() -> None:
    one = [backoff(a, base_s=1, cap_s=60, rng=random.Random(9)) for a in range(1, 6)]
    two = [backoff(a, base_s=1, cap_s=60, rng=random.Random(9)) for a in range(1, 6)]
    assert one == two
    with pytest.raises(ValueError):
        backoff(0, base_s=1, cap_s=2)


# -- the table --------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [c for c in RETRYABLE if c[1] != "imageTimeOut"])
def test_retryable_codes_retry_with_backoff_until_max_attempts_then_fail_retryable(
    status: int, code: str
) -> None:
    p = policy(max_attempts=4)
    err = api_error(status, code, "try later")
    for attempt in (1, 2, 3):
        d = p.decide(attempt, err)
        assert (d.action, d.retryable, d.code) == ("retry", True, code)
        wait = THROTTLED_WAIT_S if code.startswith("Throttling") else 0.0
        assert wait <= d.delay_s <= wait + min(30.0, 0.5 * 2 ** (attempt - 1))
    last = p.decide(4, err)
    assert (last.action, last.retryable, last.code, last.delay_s) == ("fail", True, code, 0.0)
    assert "4 calls" in last.message


def test_image_timeout_is_retried_only_a_few_times() -> None:
    err = api_error(400, "imageTimeOut", "could not download the image")
    p = policy(max_attempts=10)
    assert [p.decide(a, err).action for a in (1, 2, 3)] == ["retry", "retry", "fail"]
    assert p.decide(3, err).retryable is True
    # Never more than max_attempts either.
    assert policy(max_attempts=2).decide(2, err).action == "fail"


@pytest.mark.parametrize(("status", "code"), BAD_INPUT)
def test_bad_input_codes_fail_at_once_not_retryable(status: int, code: str) -> None:
    d = policy().decide(1, api_error(status, code, "bad image"))
    # The service's verdict on the picture, billed: copies of it in the run reuse it.
    assert d == Decision("fail", 0.0, False, code, "bad image", journal=True)
    assert not d.stops_fleet


@pytest.mark.parametrize(("status", "code"), FATAL)
def test_fatal_codes_stop_the_fleet(status: int, code: str) -> None:
    d = policy().decide(1, api_error(status, code, "denied"))
    assert (d.action, d.retryable, d.code, d.stops_fleet) == ("stop", False, code, True)


@pytest.mark.parametrize(
    ("status", "code", "action"),
    [
        (502, "HTTP.502", "retry"),  # a gateway page without a JSON code
        (429, "SomethingNew", "retry"),
        (403, "HTTP.403", "stop"),
        (401, "Unknown.Auth", "stop"),
        (400, "SomeNewImageRule", "fail"),
        (200, "WeirdCodeIn200", "retry"),
        (400, "Throttling.Brand.New", "retry"),  # families the gateway extends
        (400, "InvalidAccessKeyId.Whatever", "stop"),
    ],
)
def test_unknown_codes_follow_the_one_classification(status: int, code: str, action: str) -> None:
    assert policy().decide(1, api_error(status, code)).action == action


def test_a_plain_api_error_is_classified_by_code_not_by_its_python_class() -> None:
    assert policy().decide(1, ApiError(401, "ocrServiceNotOpen")).action == "stop"
    assert policy().decide(1, ApiError(400, "illegalImageSize")).action == "fail"


@pytest.mark.parametrize("code", ["local.timeout", "local.connection"])
def test_transport_errors_retry_then_fail_retryable(code: str) -> None:
    p = policy(max_attempts=3)
    err = TransportError(code, "no usable answer")
    assert [p.decide(a, err).action for a in (1, 2, 3)] == ["retry", "retry", "fail"]
    assert p.decide(3, err).retryable is True and p.decide(3, err).journal is False
    assert p.decide(1, err).code == code


def test_an_unreadable_answer_is_retried_once_then_fails_journalled() -> None:
    """It was billed and will most likely read the same: two calls, not ``max_attempts``."""
    with pytest.raises(UnreadableAnswer) as caught:
        read_response(200, {"x-acs-request-id": "rid-9"}, b"<html>\r\n<b>maintenance</b></html>")
    err = caught.value
    p = policy(max_attempts=6)
    first, second = p.decide(1, err), p.decide(2, err)
    assert (first.action, first.code, first.journal) == ("retry", "local.unreadableAnswer", False)
    assert 0 <= first.delay_s <= p.cap_s
    assert (second.action, second.retryable, second.journal) == ("fail", True, True)
    assert second.code == "local.unreadableAnswer" and not second.stops_fleet
    # What came back is in the row, on one line, after what was wrong with it.
    assert second.message == (
        "HTTP 200 body is not JSON (gave up after 2 calls); "
        "the answer, 33 bytes: <html>\\x0d\\x0a<b>maintenance</b></html>"
    )
    # Counted by unreadable answers when the caller counts them: a first one after three other
    # failed calls is retried once; uncounted, every call counts.
    assert p.decide(4, err, unreadable=1).action == "retry"
    assert p.decide(5, err, unreadable=2).action == "fail"
    assert p.decide(4, err).action == "fail" and "gave up after 4 calls" in p.decide(4, err).message
    assert policy(max_attempts=1).decide(1, err).action == "fail"
    assert "an empty answer" in p.decide(2, UnreadableAnswer("HTTP 200 body is not JSON")).message


def test_an_unreadable_answer_s_message_is_bounded_and_keeps_no_signed_url() -> None:
    page = "<p>GET /?Url=https://b.oss-cn-hangzhou.aliyuncs.com/a.jpg?OSSAccessKeyId=LTAIabc&Signature=s3cr3t"
    with pytest.raises(UnreadableAnswer) as caught:
        read_response(200, {}, (page + "</p>" + "x" * 5000).encode())
    message = policy().decide(2, caught.value).message
    assert len(message) <= 300 and message.endswith("...")
    assert "s3cr3t" not in message and "LTAIabc" not in message
    assert "b.oss-cn-hangzhou.aliyuncs.com/a.jpg" in message


def test_local_errors_fail_or_stop_without_a_call() -> None:
    p = policy()
    rejected = p.decide(1, ImageRejected("local.too_small", "10x10 px"))
    assert rejected == Decision("fail", 0.0, False, "local.too_small", "10x10 px")
    assert p.decide(1, InputError("no such file")).code == "local.input"
    config = p.decide(1, ConfigError("missing credentials"))
    assert (config.action, config.code, config.stops_fleet) == ("stop", "local.config", True)


def test_a_bug_fails_the_image_as_local_internal() -> None:
    d = policy().decide(2, KeyError("plate"))
    assert (d.action, d.retryable, d.code) == ("fail", False, "local.internal")
    assert "KeyError" in d.message


def test_pauses_and_cancellation_leave_the_image_pending_without_stopping_the_fleet() -> None:
    p = policy()
    stopped = p.decide(1, FleetStopped("Forbidden.RAM", "no"))
    assert (stopped.action, stopped.code, stopped.stops_fleet) == ("stop", "Forbidden.RAM", False)
    assert p.decide(1, CircuitOpen("open")).code == "local.circuit_open"
    assert p.decide(1, QuotaExhausted("spent")).code == "local.quota_exhausted"
    cancelled = p.decide(1, asyncio.CancelledError())
    assert (cancelled.action, cancelled.stops_fleet) == ("stop", False)


# -- retry-after --------------------------------------------------------------------------------


def test_retry_after_from_a_real_answer_is_the_delay() -> None:
    body = json.dumps({"RequestId": "r-1", "Code": "Throttling.User", "Message": "slow down"})
    with pytest.raises(ApiError) as caught:
        read_response(400, {"x-acs-retry-after": "1500"}, body.encode())
    assert caught.value.retry_after_s == 1.5
    d = policy().decide(1, caught.value)
    assert (d.action, d.delay_s, d.code) == ("retry", 1.5, "Throttling.User")


def test_a_throttled_call_waits_about_a_second_before_it_asks_again() -> None:
    p = policy(base_s=0.5)
    delays = [p.decide(1, api_error(400, "Throttling.User")).delay_s for _ in range(50)]
    assert all(THROTTLED_WAIT_S <= d <= THROTTLED_WAIT_S + 0.5 for d in delays)
    assert all(p.decide(1, api_error(503, "ServiceUnavailable")).delay_s <= 0.5 for _ in range(50))


def test_retry_after_is_capped_and_ignored_once_attempts_ran_out() -> None:
    err = api_error(503, "ServiceUnavailable", retry_after_s=120.0)
    p = policy(cap_s=20.0, max_attempts=3)
    assert p.decide(1, err).delay_s == 20.0
    assert p.decide(3, err).action == "fail"


# -- construction, secrets, circuit input ------------------------------------------------------


def test_policy_from_settings_and_validation() -> None:
    settings = Settings.from_env({}, retry_base_s=0.2, retry_cap_s=4.0, max_attempts=2)
    p = RetryPolicy.from_settings(settings)
    assert (p.base_s, p.cap_s, p.max_attempts) == (0.2, 4.0, 2)
    assert p.decide(2, api_error(500, "InternalError")).action == "fail"
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="unreadable_attempts"):
        RetryPolicy(unreadable_attempts=0)
    with pytest.raises(ValueError):
        p.decide(0, api_error(500, "InternalError"))


def test_messages_carry_no_signed_query_strings_and_are_bounded() -> None:
    url = "https://bucket.oss-cn-hangzhou.aliyuncs.com/cam/1.jpg?OSSAccessKeyId=LTAIabc&Signature=s3cr3t"
    d = policy().decide(1, api_error(400, "imageTimeOut", f"could not fetch {url} in time"))
    assert "s3cr3t" not in d.message and "LTAIabc" not in d.message
    assert "bucket.oss-cn-hangzhou.aliyuncs.com/cam/1.jpg" in d.message
    assert len(safe_message("x" * 5000)) <= 300


@pytest.mark.parametrize(
    ("error", "ok"),
    [
        (None, True),
        (api_error(400, "illegalImageSize"), True),  # bad input: the service is up
        (api_error(400, "Throttling.User"), True),  # the rate limiter's business
        (api_error(400, "imageTimeOut"), True),  # our origin was slow
        (api_error(500, "InternalError"), False),
        (api_error(503, "ServiceUnavailable"), False),
        (api_error(504, "ServiceTimeout"), False),
        (TransportError("local.timeout", "read timeout"), False),
        # answered, but nothing usable: every answer unreadable must open the breaker
        (UnreadableAnswer("response has no Data field"), False),
        (api_error(403, "Forbidden.RAM"), None),
        (ImageRejected("local.too_small", "tiny"), None),
    ],
)
def test_service_ok_says_what_the_circuit_breaker_records(
    error: BaseException | None, ok: bool | None
) -> None:
    assert service_ok(error) is ok
