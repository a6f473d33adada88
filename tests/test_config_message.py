"""Settings from the environment, and the work-unit format."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.config import Settings
from workers.credentials import provider_from_settings
from workers.errors import ConfigError
from workers.message import Chunk, ImageRef, has_secret_params, image_id_for, redact_url


def test_defaults_and_environment() -> None:
    s = Settings.from_env({"CARNUMBER_QPS": "50", "CARNUMBER_ENDPOINT": "http://127.0.0.1:9000"})
    assert s.qps == 50.0
    assert s.endpoint == "http://127.0.0.1:9000"
    assert Settings.from_env({}).endpoint == "https://ocr-api.cn-hangzhou.aliyuncs.com"


def test_missing_credentials_name_the_variables() -> None:
    with pytest.raises(ConfigError) as info:
        provider_from_settings(Settings(aliyun_config_file="/nonexistent/config.json"))
    assert "ALIBABA_CLOUD_ACCESS_KEY_ID" in str(info.value)
    assert "ALIBABA_CLOUD_ACCESS_KEY_SECRET" in str(info.value)


def test_bad_values_name_variable_and_rule() -> None:
    with pytest.raises(ConfigError, match="CARNUMBER_QPS='fast': must be a number"):
        Settings.from_env({"CARNUMBER_QPS": "fast"})
    with pytest.raises(ConfigError, match="CARNUMBER_ENDPOINT"):
        Settings.from_env({"CARNUMBER_ENDPOINT": "ocr.example.com"})
    with pytest.raises(ConfigError, match="CARNUMBER_QUOTA_WINDOW"):
        Settings.from_env({"CARNUMBER_QUOTA_WINDOW": "week"})


def test_toml_file_then_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[carnumber]\nqps = 5\nchunk_size = 50\n")
    s = Settings.from_env({"CARNUMBER_CHUNK_SIZE": "70"}, config_file=cfg)
    assert (s.qps, s.chunk_size) == (5, 70)
    cfg.write_text("[carnumber]\nqpz = 5\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.from_env({}, config_file=cfg)


def test_secret_never_in_repr() -> None:
    s = Settings.from_env(
        {"ALIBABA_CLOUD_ACCESS_KEY_ID": "id", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "topsecret"}
    )
    assert "topsecret" not in repr(s)
    assert "topsecret" not in repr(s.static_credentials())


def test_redaction_and_stable_ids() -> None:
    signed = "https://b.oss-cn-hangzhou.aliyuncs.com/cam/1.jpg?OSSAccessKeyId=AK&Expires=1&Signature=abc&v=2"
    assert redact_url(signed) == "https://b.oss-cn-hangzhou.aliyuncs.com/cam/1.jpg?v=2"
    assert has_secret_params(signed)
    assert not has_secret_params("https://h/x.jpg?v=2")
    assert image_id_for(signed) == image_id_for(
        "https://b.oss-cn-hangzhou.aliyuncs.com/cam/1.jpg?v=2"
    )
    assert redact_url("https://user:pw@h/x.jpg") == "https://h/x.jpg"


def test_chunk_round_trip_and_part_names() -> None:
    refs = (ImageRef("file:///a/1.jpg", meta={"camera": "c1"}), ImageRef("file:///a/2.jpg"))
    chunk = Chunk("run1", "0000003", refs)
    again = Chunk.from_wire(chunk.to_wire())
    assert again == chunk
    assert again.part_name == chunk.part_name
    assert Chunk("run1", "0000003", refs[:1]).part_name != chunk.part_name
    with pytest.raises(ValueError, match="format v9"):
        Chunk.from_wire({**chunk.to_wire(), "v": 9})
