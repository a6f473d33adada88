"""Pure parts of the local server: truth embedding, the registry, nonces, the QPS window,
the fault plan and the verifier against the official SDK's own requests."""

from __future__ import annotations

import calendar
import hashlib
import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from ocrserver.auth import NonceCache, Verifier, parse_keys
from ocrserver.faults import FaultConfig, FaultPlan
from ocrserver.ratelimit import SecondWindowLimiter
from ocrserver.recognizers import get_recognizer
from ocrserver.recognizers.base import DetectedPlate, ImageInput
from ocrserver.truth import embed_truth, make_test_image, read_truth
from workers.errors import ApiError, ConfigError
from workers.imagecheck import check_image

VECTORS = Path(__file__).resolve().parents[1].parent / "shared/reference/acs3-signature-vectors.json"


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truth_round_trips_through_a_valid_image(fmt: str) -> None:
    plates = [
        {"text": "浙A12345", "type": "新能源车", "polygon": [[1, 2], [30, 2], [30, 12], [1, 12]],
         "prob": 0.9},
        "粤B6789X",
    ]
    img = make_test_image(plates, width=400, height=300, fmt=fmt)
    info = check_image(img)  # still a valid image for the service's rules
    assert (info.format, info.width, info.height) == ({"png": "PNG", "jpeg": "JPEG"}[fmt], 400, 300)
    got = read_truth(img)
    assert got is not None
    assert [p.text for p in got] == ["浙A12345", "粤B6789X"]
    assert got[0].plate_type == "新能源车" and got[0].prob == 0.9
    assert got[0].polygon == ((1, 2), (30, 2), (30, 12), (1, 12))
    x0, y0 = got[1].polygon[0]
    x1, y1 = got[1].polygon[2]
    assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300  # laid out inside the picture


def test_embed_replaces_and_empty_means_no_plate() -> None:
    img = make_test_image(["浙A12345"])
    again = embed_truth(embed_truth(img, ["京A1"]), [])
    assert read_truth(again) == []
    assert again.count(b"carnumber-truth") == 1
    jpg = embed_truth(embed_truth(make_test_image([], fmt="jpeg"), ["京A1"]), ["京B2"])
    assert [p.text for p in read_truth(jpg) or []] == ["京B2"]
    assert jpg.count(b"carnumber-truth") == 1


def test_no_truth_and_unsupported_formats() -> None:
    assert read_truth(b"%PDF-1.4") is None
    assert read_truth(b"\x89PNG\r\n\x1a\n") is None
    with pytest.raises(ValueError):
        embed_truth(b"GIF89a....", ["A"])
    with pytest.raises(ValueError):
        make_test_image(["A"], fmt="gif")


def test_registry() -> None:
    assert get_recognizer("replay").name == "replay"
    with pytest.raises(ConfigError, match="onnx, replay"):
        get_recognizer("tesseract")


def test_replay_prefers_embedded_truth_over_sidecar(tmp_path: Path) -> None:
    img = make_test_image(["浙A12345"])
    sha = hashlib.sha256(img).hexdigest()
    sidecar = tmp_path / "t.jsonl"
    sidecar.write_text(json.dumps({"sha256": sha, "plates": [{"text": "X"}]}) + "\n")
    rec = get_recognizer("replay", truth_path=str(sidecar))
    got = rec.recognize(ImageInput(img, 320, 240, sha))
    assert [p.text for p in got] == ["浙A12345"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"plates": []}\n')
    with pytest.raises(ConfigError, match="line 1"):
        get_recognizer("replay", truth_path=str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        get_recognizer("replay", truth_path=str(tmp_path / "missing.jsonl"))


def test_nonce_cache_expires_after_the_window() -> None:
    cache = NonceCache(window_s=900)
    assert cache.add("k", "n1", now=1000.0)
    assert not cache.add("k", "n1", now=1500.0)
    assert cache.add("k2", "n1", now=1500.0)  # per key
    assert cache.add("k", "n1", now=1901.0)  # expired, so usable again
    assert len(cache) == 2  # the first n1 was purged; k2's n1 and the new n1 remain
    small = NonceCache(window_s=900, max_nonces=3)
    for i in range(10):
        small.add("k", str(i), now=1.0)
    assert len(small) == 3


def test_second_window_limiter() -> None:
    lim = SecondWindowLimiter(3)
    assert [lim.try_acquire("a", 100.1 + i * 0.1) for i in range(5)] == [True] * 3 + [False] * 2
    assert lim.try_acquire("b", 100.9)  # per key
    assert lim.try_acquire("a", 101.0)  # a new whole second
    assert SecondWindowLimiter.retry_after_ms(100.25) == 750
    assert all(SecondWindowLimiter(0).try_acquire("a", 5.0) for _ in range(100))


def test_fault_plan_is_seeded_and_respects_rates() -> None:
    cfg = FaultConfig(rate_500=0.2, rate_reset=0.1, rate_slow=0.5, slow_ms=10)
    a = [FaultPlan(cfg, seed=7).draw() for _ in range(1)]
    plan1, plan2 = FaultPlan(cfg, seed=7), FaultPlan(cfg, seed=7)
    seq1 = [plan1.draw() for _ in range(2000)]
    assert seq1 == [plan2.draw() for _ in range(2000)]
    assert a[0] == seq1[0]
    kinds = [i.kind for i in seq1]
    assert 0.15 < kinds.count("500") / 2000 < 0.25
    assert 0.06 < kinds.count("reset") / 2000 < 0.14
    assert 0.4 < sum(1 for i in seq1 if i.slow_ms == 10) / 2000 < 0.6
    plan1.reseed()
    assert plan1.draw() == seq1[0]
    with pytest.raises(ValueError):
        FaultConfig(rate_500=0.7, rate_503=0.5)
    with pytest.raises(ValueError):
        FaultConfig(rate_hang=1.5)


def test_parse_keys() -> None:
    keys = parse_keys("a:b, c:d:tok")
    assert keys["a"].access_key_secret == "b" and keys["c"].security_token == "tok"
    with pytest.raises(ValueError) as err:
        parse_keys("a:,c:supersecret")
    assert "supersecret" not in str(err.value)


@pytest.mark.skipif(not VECTORS.exists(), reason="../shared is not beside this clone")
def test_verifier_accepts_the_official_sdk_requests() -> None:
    vectors = json.loads(VECTORS.read_text())
    when = float(calendar.timegm((2026, 11, 24, 0, 0, 0)))  # the vectors' fixed x-acs-date
    for vec in vectors["vectors"]:
        verifier = Verifier(parse_keys(f"{vec['access_key_id']}:{vec['access_key_secret']}"),
                            clock=lambda: when + 60)
        headers = {k.lower(): v for k, v in vec["headers"].items()}
        params = dict(parse_qsl(urlsplit(vec["url"]).query, keep_blank_values=True))
        body = bytes.fromhex(vec["body_hex"])
        assert verifier.verify("POST", params, headers, body).access_key_id == "testid"
        with pytest.raises(ApiError) as err:  # the very same request again: nonce reused
            verifier.verify("POST", params, headers, body)
        assert err.value.code == "SignatureNonceUsed"
        late = Verifier(verifier.keys, clock=lambda: when + 16 * 60)
        with pytest.raises(ApiError) as err:
            late.verify("POST", params, headers, body)
        assert err.value.code == "InvalidTimeStamp.Expired"


def test_detected_plate_defaults_from_plain_text() -> None:
    (plate,) = read_truth(make_test_image(["浙A12345"])) or []
    assert isinstance(plate, DetectedPlate)
    assert plate.plate_type == "小型汽车" and 0 < plate.prob <= 1
