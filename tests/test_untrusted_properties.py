"""Property tests (Hypothesis) over the sources and the image checks: whatever the bytes and names,
every listed item gets exactly one outcome, ids are stable and distinct, and nothing raises out of
a chunk. Each property runs a bounded number of generated cases (``SETTINGS``: 40 each, a few
seconds in all); ``CARNUMBER_PROPERTY_EXAMPLES=2000`` runs a longer search by hand.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from ocrserver.bad_corpus import raw_zip, zip_entry
from producers.sources import Filter, open_source
from workers.api.client import Image
from workers.config import Settings
from workers.errors import CarnumberError, ImageRejected, InputError, TransportError
from workers.imagecheck import check_image, check_parts
from workers.message import ImageRef, canonical_url, image_id_for, kept_params, redact_url
from workers.storage import Resolver
from workers.storage.signed import SignedObject
from workers.storage.uris import archive_uri, decode_part, encode_part, file_uri, parse_uri

SETTINGS = settings(
    max_examples=int(os.environ.get("CARNUMBER_PROPERTY_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (w, h), (w % 256, h % 256, 7)).save(buf, format="JPEG")
    return buf.getvalue()


GOOD = _jpeg(40, 30)
IMAGE_NAME = Filter()  # what a source lists: names with an image extension ('..jpg' has none)


def _zip_name(raw: bytes, flags: int) -> str:
    try:
        return raw.decode("utf-8") if flags & 0x800 else raw.decode("cp437")
    except UnicodeDecodeError:
        return raw.decode("cp437")


# Member names: any bytes (not UTF-8 included) from a small alphabet so that repeats happen, with
# an image extension so the source lists them.
names = st.builds(
    lambda stem, ext: stem + ext,
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(c for c in b if c not in (0, 0x2F)) or b"x")
    | st.sampled_from([b"a", b"../a", b"/abs/a", "车".encode("gbk"), b"%41", b"#?", b"dup"]),
    st.sampled_from([b".jpg", b".JPG", b".png"]),
)
# Member data: a good picture, garbage, nothing, or a good picture cut short.
payloads = st.one_of(
    st.just(GOOD),
    st.binary(max_size=300),
    st.just(b""),
    st.integers(min_value=1, max_value=len(GOOD) - 1).map(lambda n: GOOD[:n]),
)


def _outcomes_are_one_per_ref(refs: list[ImageRef], out: list[object]) -> None:
    assert len(out) == len(refs)
    for got in out:
        assert isinstance(got, Image | SignedObject | ImageRejected | InputError | TransportError), got
        if isinstance(got, TransportError):
            assert got.code != "local.internal", got  # never a crash


def _list_and_resolve(source: str) -> list[ImageRef]:
    try:
        refs = list(open_source(source, Settings()))
    except InputError:
        return []  # the source itself is unreadable (its very first entry): refused before a run
    assert refs == list(open_source(source, Settings()))  # the same items, in the same order
    assert len({r.image_id for r in refs}) == len(refs)  # each item an id of its own
    r = Resolver(Settings())
    try:
        _outcomes_are_one_per_ref(refs, r.resolve_many(refs))
    finally:
        r.close()
    return refs


@SETTINGS
@given(
    members=st.lists(
        st.tuples(
            names,
            payloads,
            st.sampled_from([tarfile.REGTYPE] * 4 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE]),
        ),
        max_size=8,
    ),
    compress=st.booleans(),
    cut=st.one_of(st.none(), st.integers(min_value=1, max_value=6000)),
)
def test_any_tar_lists_and_resolves_one_outcome_per_member(
    members: list[tuple[bytes, bytes, bytes]], compress: bool, cut: int | None
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(os.fsdecode(name))
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.linkname = "a.jpg" if kind != tarfile.FIFOTYPE else ""
                tf.addfile(info)
    data = buf.getvalue()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("t.tar.gz" if compress else "t.tar")
        path.write_bytes(data[:cut] if cut is not None else data)  # possibly half-copied
        refs = _list_and_resolve(str(path))
        if cut is None:  # whole: every image-named member is one item (repeats refused, not lost)
            assert len(refs) == len([m for m in members if IMAGE_NAME.name_ok(os.fsdecode(m[0]))])


@SETTINGS
@given(
    entries=st.lists(
        st.tuples(
            names,
            payloads,
            st.sampled_from([0, 0, 8, 12, 14, 97]),  # stored, deflate, bzip2, lzma, unknown
            st.sampled_from([0, 0, 0x1, 0x800, 0x801]),  # encrypted, UTF-8 flagged
            st.booleans(),  # a CRC that lies
            st.sampled_from([None, 0, 1000, 4_000_000_000]),  # a declared size that lies
        ),
        max_size=8,
    )
)
def test_any_zip_lists_and_resolves_one_outcome_per_member(
    entries: list[tuple[bytes, bytes, int, int, bool, int | None]],
) -> None:
    built = []
    for name, data, method, flags, bad_crc, size in entries:
        stored = zlib.compress(data)[2:-4] if method == 8 else data
        crc = zlib.crc32(data) ^ (1 if bad_crc else 0)
        built.append(
            zip_entry(
                name, stored, method=method, flags=flags, crc=crc, size=len(data) if size is None else size
            )
        )
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "z.zip"
        path.write_bytes(raw_zip(built))
        refs = _list_and_resolve(str(path))
        assert len(refs) == len([e for e in entries if IMAGE_NAME.name_ok(_zip_name(e[0], e[3]))])


@SETTINGS
@given(
    lines=st.lists(
        st.binary(max_size=80) | st.sampled_from([b"", b"# c", b"a.jpg", b"https://h/x.jpg?sig=1&se=2"]),
        max_size=12,
    )
)
def test_any_manifest_line_is_one_item_or_a_repeat(lines: list[bytes]) -> None:
    lines = [raw.replace(b"\n", b" ").replace(b"\r", b" ") for raw in lines]  # one line each
    with tempfile.TemporaryDirectory() as d:
        manifest = Path(d) / "m.txt"
        manifest.write_bytes(b"\n".join(lines) + b"\n")
        repeats: list[InputError] = []
        refs = list(open_source(str(manifest), Settings(), on_skip=repeats.append))
        # Each line that is neither blank nor a comment is an item, or a repeat of an earlier one.
        assert len(refs) + len(repeats) == sum(1 for n, raw in enumerate(lines) if _is_entry(raw, n == 0))
        assert all(r.refused is None or r.refused[0].startswith("local.") for r in refs)
        assert len({r.image_id for r in refs}) == len(refs)


def _is_entry(raw: bytes, first: bool) -> bool:
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8").strip()
    except UnicodeDecodeError:
        return True  # refused, but an item
    return bool(text) and not text.startswith("#")


@SETTINGS
@given(data=st.binary(max_size=2000) | payloads)
def test_the_image_checks_refuse_or_accept_never_crash(data: bytes) -> None:
    try:
        info = check_image(data)
    except ImageRejected as exc:
        assert exc.code.startswith("local.")
        return
    assert info.width > 15 and info.height > 15
    # The parts of the file decide as the whole does, or cannot tell.
    for head in (16, 64, 512):
        got = check_parts(data[:head], data[-64:], len(data))
        assert got is None or (got.width, got.height) == (info.width, info.height)


@SETTINGS
@given(name=st.binary(min_size=1, max_size=20).map(lambda b: os.fsdecode(bytes(c for c in b if c) or b"x")))
def test_uris_of_any_name_are_valid_utf8_and_read_back_the_same_name(name: str) -> None:
    for uri in (
        file_uri("/data/" + name),
        archive_uri("tar", "/data/a.tar", name),
        archive_uri("zip", "/d/z.zip", name),
    ):
        uri.encode("utf-8")  # goes into JSON, Redis and Parquet
        image_id_for(uri)
        loc = parse_uri(uri)
        assert (loc.path if loc.kind == "file" else loc.member) == (
            "/data/" + name if loc.kind == "file" else name
        )
    assert decode_part(encode_part(name)) == name


query_names = st.sampled_from(
    [
        "w",
        "id",
        "sig",
        "se",
        "sv",
        "Signature",
        "X-Amz-Signature",
        "x-oss-signature",
        "auth_key",
        "token",
        "e",
        "t",
        "sign",
        "X-Goog-Credential",
        "Key-Pair-Id",
        "mytoken",
    ]
)


@SETTINGS
@given(
    params=st.lists(st.tuples(query_names, st.text(alphabet="abcXYZ019", max_size=6)), max_size=8),
    keep=st.sampled_from(["", "w", "w,id"]),
)
def test_only_kept_parameters_survive_into_a_canonical_source(
    params: list[tuple[str, str]], keep: str
) -> None:
    url = "https://cdn.example.com/p/x.jpg?" + "&".join(f"{k}=SECRET{v}" for k, v in params)
    kept = kept_params(keep)
    source = canonical_url(url, kept)
    query = source.partition("?")[2]
    assert all(seg.split("=")[0].lower() in kept for seg in query.split("&") if seg)
    # The id ignores the signature, whatever else changes.
    assert image_id_for(url) == image_id_for(redact_url(url))
    assert "sig=" not in redact_url(url).lower().replace("sign=", "")
    assert isinstance(CarnumberError, type)
