"""Parsing the envelope and its Data string into typed results."""

from __future__ import annotations

import json

import httpx
import pytest

from ocrserver.config import ServerConfig
from ocrserver.faults import MALFORMED_SHAPES, FaultConfig
from ocrserver.server import start_server
from ocrserver.truth import make_test_image
from workers.api.client import Client, Image, read_response
from workers.api.codes import classify
from workers.api.response import RAW_MAX_CHARS, parse_envelope, scrub
from workers.config import Credentials
from workers.errors import (
    BadImageError,
    FatalApiError,
    RetryableApiError,
    TransportError,
    UnreadableAnswer,
    Verdict,
)

PNG = make_test_image(["浙A12345"])
SHAPE = "Data does not have the documented shape"

SEED_DATA = {
    "data": {
        "secondary_cls": {"type_str": "小型汽车", "prob": 0.955191},
        "data": {"车牌": "黑AF6655"},
        "score": 1.05,
        "info": [
            {
                "value": "黑AF6655",
                "key": "车牌",
                "key_prob": 0.99926,
                "value_prob": 0.99926,
                "key_loc": "",
                "value_loc": "469,450,1220,419,1227,588,476,620",
            }
        ],
    },
    "height": 1200,
    "orgHeight": 1200,
    "orgWidth": 1600,
    "prism_keyValueInfo": [
        {
            "key": "车牌",
            "keyProb": 99,
            "value": "黑AF6655",
            "valuePos": [
                {"x": 469, "y": 450},
                {"x": 1220, "y": 419},
                {"x": 1227, "y": 588},
                {"x": 476, "y": 620},
            ],
            "valueProb": 99,
        }
    ],
    "structure_list": [{"$ref": "$.data"}],
    "width": 1600,
}


def test_seed_example_with_back_reference() -> None:
    rec = parse_envelope({"RequestId": "r1", "Data": json.dumps(SEED_DATA, ensure_ascii=False)})
    assert rec.request_id == "r1"
    assert len(rec.plates) == 1
    plate = rec.plates[0]
    assert plate.text == "黑AF6655"
    assert plate.plate_type == "小型汽车"
    assert plate.type_prob == pytest.approx(0.955191)
    assert plate.prob == pytest.approx(0.99926)
    assert plate.polygon == ((469, 450), (1220, 419), (1227, 588), (476, 620))
    assert (rec.width, rec.height, rec.org_width, rec.org_height) == (1600, 1200, 1600, 1200)


def test_data_quoted_twice_as_in_the_published_example() -> None:
    twice = json.dumps(json.dumps(SEED_DATA, ensure_ascii=False))
    rec = parse_envelope({"RequestId": "r", "Data": twice})
    assert [p.text for p in rec.plates] == ["黑AF6655"]


def test_several_plates_and_refs_into_the_list() -> None:
    second = json.loads(json.dumps(SEED_DATA["data"]))
    second["data"]["车牌"] = "京A12345"
    second["info"][0]["value"] = "京A12345"
    second["info"][0]["value_loc"] = "1,2,3,4,5,6,7,8"
    second["secondary_cls"]["type_str"] = "新能源车"
    doc = dict(SEED_DATA, structure_list=[{"$ref": "$.data"}, second, {"$ref": "$.structure_list[1]"}])
    rec = parse_envelope({"RequestId": "r", "Data": json.dumps(doc)})
    assert [p.text for p in rec.plates] == ["黑AF6655", "京A12345", "京A12345"]
    assert rec.plates[1].polygon == ((1, 2), (3, 4), (5, 6), (7, 8))
    assert rec.plates[1].plate_type == "新能源车"


def test_no_plate_is_a_result_with_zero_plates() -> None:
    doc = {
        "data": {},
        "structure_list": [],
        "prism_keyValueInfo": [],
        "width": 10,
        "height": 10,
        "orgWidth": 10,
        "orgHeight": 10,
    }
    rec = parse_envelope({"RequestId": "r", "Data": json.dumps(doc)})
    assert rec.plates == ()
    assert rec.width == 10


def _answer(first_plate: dict[str, object]) -> bytes:
    return json.dumps({"Data": json.dumps({"data": first_plate})}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "HTTP 200 body is not JSON"),
        (b"", "HTTP 200 body is not JSON"),
        (b"<html><body>Request blocked</body></html>", "HTTP 200 body is not JSON"),
        (b"[1, 2]", "response body is not a JSON object"),
        (b'{"RequestId":"x"}', "response has no Data field"),
        (b'{"RequestId":"x","Data":"{broken"}', "Data is not valid JSON"),
        (b'{"RequestId":"x","Data":"[1]"}', "Data is not a JSON object"),
        (b'{"RequestId":"x","Data":"{\\"width\\": \\"wide\\"}"}', SHAPE),
        (b'{"RequestId":"x","Data":"{\\"structure_list\\": [7]}"}', SHAPE),
        # A number as plate type used to reach the part's string column and fail the chunk's write.
        (_answer({"data": {"车牌": "A1"}, "secondary_cls": {"type_str": 7}}), SHAPE),
        (_answer({"data": {"车牌": 12345}}), SHAPE),
    ],
    ids=["text", "empty", "html", "list", "no-data", "data-text", "data-list", "wrong-int", "wrong-entry",
         "wrong-type", "wrong-plate"],
)
def test_a_2xx_that_is_not_the_envelope_is_an_unreadable_answer(body: bytes, reason: str) -> None:
    with pytest.raises(UnreadableAnswer) as info:
        read_response(200, {"x-acs-request-id": "hdr-1"}, body)
    err = info.value
    assert isinstance(err, TransportError)  # no usable answer, for whoever only asks that
    assert (err.code, err.status, err.size) == ("local.unreadableAnswer", 200, len(body))
    assert err.message.startswith(reason)
    assert err.raw == body.decode()  # as received, not re-serialised
    # The body's own RequestId, else the header's: support can find the call either way.
    assert err.request_id == ("x" if b'"RequestId":"x"' in body else "hdr-1")


def test_the_kept_answer_is_bounded_and_a_large_body_is_not_decoded_whole() -> None:
    body = b"<html>" + "车".encode() * 3_000_000 + b"</html>"  # 9 MB
    with pytest.raises(UnreadableAnswer) as info:
        read_response(200, {}, body)
    assert info.value.size == len(body)
    assert len(info.value.raw) == RAW_MAX_CHARS and info.value.raw.startswith("<html>车车")
    # Bytes cut inside a character become one replacement character, not an error.
    with pytest.raises(UnreadableAnswer) as cut:
        read_response(200, {}, "车".encode()[:2])
    assert cut.value.raw == "\ufffd"


@pytest.mark.parametrize(
    "leak",
    [
        "GET /?Url=https://b.oss-cn-hangzhou.aliyuncs.com/a.jpg?OSSAccessKeyId=AK&Signature=S3CR3T&Expires=9",
        "POST /?Url=http%3A%2F%2Fh%2Fa.png%3FX-Amz-Signature%3DS3CR3T%26X-Amz-Date%3D1",
        "x-acs-security-token: S3CR3T\nx-acs-date: 2026",
        "Authorization: ACS3-HMAC-SHA256 Credential=AKID,SignedHeaders=host,Signature=S3CR3T",
        '{"SecurityToken": "S3CR3T", "n": 1}',
        '{"Data": "{\\"AccessKeySecret\\":\\"S3CR3T\\"}"}',
        "see https://user:S3CR3T@host/x and http%3A%2F%2Fuser%3AS3CR3T%40host",
    ],
)
def test_secrets_an_answer_echoes_are_scrubbed_from_what_is_kept(leak: str) -> None:
    with pytest.raises(UnreadableAnswer) as info:
        read_response(200, {}, f"<html><p>{leak}</p></html>".encode())
    assert "S3CR3T" not in info.value.raw and "***" in info.value.raw
    assert scrub("SignatureDoesNotMatch, a token of 3 words") == "SignatureDoesNotMatch, a token of 3 words"


@pytest.mark.parametrize("shape", MALFORMED_SHAPES)
def test_the_local_server_s_unreadable_answers_over_real_http(shape: str) -> None:
    """Every ``--fault-malformed`` shape, through our client and httpx on loopback."""
    faults = FaultConfig(rate_malformed=0.5, malformed_shape=shape)
    with start_server(ServerConfig(keys="testid:testsecret", faults=faults, seed=2)) as srv, httpx.Client(
        timeout=5
    ) as http:
        client = Client(srv.url, Credentials("testid", "testsecret"), http)
        unreadable: list[UnreadableAnswer] = []
        for _ in range(8):
            try:
                assert client.recognize(Image(body=PNG)).plates[0].text == "浙A12345"
            except UnreadableAnswer as exc:
                unreadable.append(exc)
        stats = srv.app.stats.to_json()
    assert 0 < len(unreadable) < 8 and stats["answers"]["(malformed)"] == len(unreadable)
    for err in unreadable:
        assert err.code == "local.unreadableAnswer"
        # from the body, or else the x-acs-request-id header
        assert err.request_id and (err.request_id in err.raw or shape in ("truncated", "empty"))


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "Throttling.User", RetryableApiError),
        (503, "ServiceUnavailable", RetryableApiError),
        (400, "imageTimeOut", RetryableApiError),
        (415, "unsupportedImageFormat", BadImageError),
        (400, "illegalImageUrl", BadImageError),
        (400, "SignatureDoesNotMatch", FatalApiError),
        (404, "InvalidAccessKeyId.NotFound", FatalApiError),
        (401, "OcrServiceExpired", FatalApiError),
        (200, "SomethingNew", RetryableApiError),
        (502, "HTTP.502", RetryableApiError),
    ],
)
def test_error_answers_are_classified(status: int, code: str, cls: type) -> None:
    body = json.dumps({"RequestId": "rid", "HostId": "h", "Code": code, "Message": "m"}).encode()
    with pytest.raises(cls) as info:
        read_response(status, {"x-acs-retry-after": "1500"}, body)
    err = info.value
    assert (err.status, err.code, err.message, err.request_id) == (status, code, "m", "rid")
    assert err.retry_after_s == pytest.approx(1.5)


def test_lower_case_error_fields_and_non_json_gateway_pages() -> None:
    with pytest.raises(FatalApiError) as info:
        read_response(403, {}, b'{"code":"Forbidden.RAM","message":"no","requestId":"q"}')
    assert info.value.request_id == "q"
    with pytest.raises(RetryableApiError) as gw:
        read_response(502, {}, b"<html>bad gateway</html>")
    assert gw.value.code == "HTTP.502"


def test_classify_families_and_fallbacks() -> None:
    assert classify("Throttling.Whatever", 400) is Verdict.RETRY
    assert classify("InvalidAccessKeyId.Suspended", 400) is Verdict.FATAL
    assert classify("Unknown", 403) is Verdict.FATAL
    assert classify("Unknown", 400) is Verdict.BAD_INPUT


def test_to_json_names_every_field_and_round_trips() -> None:
    """``Recognition.to_json`` is spelled out (fast): a field added later must not be forgotten."""
    from dataclasses import fields

    from workers.api.response import Plate, Recognition

    rec = Recognition(
        "r", (Plate("浙A1", 0.5, "蓝牌", 0.4, ((1, 2), (3, 2), (3, 4), (1, 4))), Plate("b")), 1, 2, 3, 4, 0.7
    )
    doc = rec.to_json()
    assert set(doc) == {f.name for f in fields(Recognition)} - {"raw"}
    assert set(doc["plates"][0]) == {f.name for f in fields(Plate)}
    assert Recognition.from_json(doc) == rec
