"""Parsing the envelope and its Data string into typed results."""

from __future__ import annotations

import json

import pytest

from workers.api.client import read_response
from workers.api.codes import classify
from workers.api.response import parse_envelope
from workers.errors import BadImageError, FatalApiError, RetryableApiError, TransportError, Verdict

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


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"RequestId": "x"}',
        b'{"RequestId":"x","Data":"{broken"}',
        b'{"RequestId":"x","Data":"[1]"}',
    ],
)
def test_malformed_bodies_are_transport_errors(body: bytes) -> None:
    with pytest.raises(TransportError) as info:
        read_response(200, {}, body)
    assert info.value.code == "local.malformed"


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
