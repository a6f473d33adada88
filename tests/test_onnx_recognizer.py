"""The offline recognizer end to end on generated images: text, type, polygon, batching, edges."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ocrserver.recognizers.base import PLATE_TYPES, ImageInput
from ocrserver.recognizers.onnx import OnnxRecognizer
from ocrserver.samples import SampleTruth, generate_archive, read_rate
from workers.errors import ConfigError, ImageRejected


@pytest.fixture(scope="module")
def recognizer() -> Iterator[OnnxRecognizer]:
    rec = OnnxRecognizer(workers=2)
    yield rec
    rec.close()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SampleTruth]]:
    out = tmp_path_factory.mktemp("onnx-samples")
    return out, generate_archive(out, count=24, seed=0)


def _input(data: bytes, name: str | None = None) -> ImageInput:
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    return ImageInput(data, w, h, hashlib.sha256(data).hexdigest(), name=name)


def _iou(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> float:
    ax0, ay0 = min(p[0] for p in a), min(p[1] for p in a)
    ax1, ay1 = max(p[0] for p in a), max(p[1] for p in a)
    bx0, by0 = min(p[0] for p in b), min(p[1] for p in b)
    bx1, by1 = max(p[0] for p in b), max(p[1] for p in b)
    iw, ih = max(0, min(ax1, bx1) - max(ax0, bx0)), max(0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)


def test_reads_generated_plates(recognizer: OnnxRecognizer, archive: tuple[Path, list[SampleTruth]]
                                ) -> None:
    out, truths = archive
    hits = 0
    for sample in truths:
        plates = recognizer.recognize(_input((out / sample.name).read_bytes(), sample.name))
        for truth in sample.plates:
            match = [p for p in plates if p.text == truth.text]
            if not match:
                continue
            hits += 1
            plate = match[0]
            assert plate.plate_type == truth.plate_type
            assert plate.plate_type in PLATE_TYPES
            assert 0.0 < plate.prob <= 1.0 and 0.0 < plate.type_prob <= 1.0
            # the polygon is in original-image pixels and covers the drawn plate
            assert _iou(plate.polygon, truth.polygon) > 0.6
    total = sum(len(s.plates) for s in truths)
    # about 90% of generated plates are read exactly over large archives (see the report)
    assert hits / total >= 0.75, f"{hits}/{total}"


def test_batch_matches_single_and_read_rate(recognizer: OnnxRecognizer,
                                            archive: tuple[Path, list[SampleTruth]]) -> None:
    out, truths = archive
    inputs = [_input((out / s.name).read_bytes()) for s in truths[:6]]
    assert recognizer.batching is True
    assert recognizer.recognize_batch(inputs) == [recognizer.recognize(i) for i in inputs]
    assert read_rate(recognizer, out, truths) >= 0.75


def test_plain_and_edge_images_do_not_crash(recognizer: OnnxRecognizer,
                                            archive: tuple[Path, list[SampleTruth]]) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (90, 120, 90)).save(buf, format="PNG")
    assert recognizer.recognize(_input(buf.getvalue())) == []
    # a plate cut by the image border: crop a generated scene through its plate
    out, truths = archive
    sample = truths[0]
    poly = sample.plates[0].polygon
    with Image.open(out / sample.name) as img:
        cx = (poly[0][0] + poly[1][0]) // 2
        cut = img.crop((cx, 0, img.width, img.height))
        buf = io.BytesIO()
        cut.save(buf, format="JPEG")
    plates = recognizer.recognize(_input(buf.getvalue()))
    for p in plates:
        assert all(0 <= x < cut.width and 0 <= y < cut.height for x, y in p.polygon)
    # tiny and extreme shapes
    for size in ((16, 16), (400, 17), (17, 400)):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), np.uint8)).save(
            buf, format="PNG")
        assert isinstance(recognizer.recognize(_input(buf.getvalue())), list)


def test_tight_crop_is_read_without_detection(recognizer: OnnxRecognizer) -> None:
    import random

    from ocrserver.samples import random_plate, render_plate

    text, style = random_plate(random.Random(3), "blue")
    plate = render_plate(text, style).resize((94, 30))
    buf = io.BytesIO()
    plate.save(buf, format="PNG")
    plates = recognizer.recognize(_input(buf.getvalue()))
    assert [p.text for p in plates] == [text]
    assert plates[0].polygon == ((0, 0), (93, 0), (93, 29), (0, 29))


def test_gif_and_bad_bytes(recognizer: OnnxRecognizer) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 10, 10)).save(buf, format="GIF")
    assert recognizer.recognize(_input(buf.getvalue())) == []
    with pytest.raises(ImageRejected):
        recognizer.recognize(ImageInput(b"not an image", 10, 10, "0" * 64))


def test_missing_model_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"clp_det\.onnx"):
        OnnxRecognizer(str(tmp_path))


def test_served_by_the_local_server(archive: tuple[Path, list[SampleTruth]]) -> None:
    """``carnumber serve --recognizer onnx`` answers a signed call with the model's reading."""
    import httpx

    from ocrserver.config import ServerConfig
    from ocrserver.server import start_server
    from workers.api.client import Client
    from workers.api.client import Image as Body
    from workers.config import Credentials

    out, truths = archive
    with start_server(ServerConfig(keys="onnxid:onnxsecret", recognizer="onnx")) as srv, \
            httpx.Client(timeout=30) as http:
        client = Client(srv.url, Credentials("onnxid", "onnxsecret"), http)
        seen = total = 0
        for sample in truths[:6]:
            # re-encode without the embedded truth: the answer must come from the model
            buf = io.BytesIO()
            with Image.open(out / sample.name) as img:
                img.save(buf, format="JPEG", quality=92)
            result = client.recognize(Body(body=buf.getvalue()))
            texts = {p.text for p in result.plates}
            total += len(sample.plates)
            seen += sum(t.text in texts for t in sample.plates)
            for plate in result.plates:
                assert plate.polygon is not None and plate.plate_type in PLATE_TYPES
        assert seen >= total - 2, f"{seen}/{total}"
