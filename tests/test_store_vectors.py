"""The store's format rules hold alike everywhere: format.py's checker, the host decoder with its C helper and with
numpy, and the GPU planner accept and refuse the same frames (tests/store_vectors.py), in words of the same kind."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import zstandard
from store_vectors import BUILDERS, KINDS, Vector, kind_of, vectors

from runtime_shim.store import format as fmt
from runtime_shim.store.decode import decode_frame_into

try:
    from runtime_shim.store import _planes
except ImportError:
    _planes = None

VECTORS = {v.name: v for v in vectors()}
SOUND = [name for name, v in VECTORS.items() if v.expect is None]


def _outcome(call: Callable[[], object]) -> str | None:
    """None when ``call`` returns, else the kind of the message it raised."""
    try:
        call()
    except (ValueError, zstandard.ZstdError) as e:
        return kind_of(str(e))
    return None


def test_every_kind_is_told_apart_by_its_words() -> None:
    for kind, builder in BUILDERS.items():
        sample = builder(*range(1, builder.__code__.co_argcount + 1))
        assert kind_of(sample) == kind, sample
    assert len(KINDS) == len(set(KINDS))


def test_the_vectors_cover_sound_frames_and_every_kind_of_fault() -> None:
    assert len(SOUND) >= 8
    faults = {v.expect for v in VECTORS.values()} - {None}
    assert faults >= set(BUILDERS) - {"element size"}  # the manifest already refuses another element size


@pytest.mark.parametrize("name", list(VECTORS))
def test_format_checker(name: str) -> None:
    v = VECTORS[name]
    assert _outcome(lambda: fmt.check_frame(v.stored, v.encoding, v.element_size, v.raw_size)) == v.expect


@pytest.mark.parametrize("name", list(VECTORS))
def test_host_decoder_agrees(impl: str, name: str) -> None:
    v = VECTORS[name]
    out = bytearray(v.raw_size)
    assert _outcome(lambda: decode_frame_into(v.stored, v.encoding, v.element_size, memoryview(out))) == v.expect
    if v.expect is None and v.raw is not None:
        assert bytes(out) == v.raw


@pytest.mark.parametrize("name", list(VECTORS))
def test_gpu_planner_agrees(impl: str, name: str) -> None:
    from test_gpu_decode import run_plan_on_host

    from runtime_shim.gpu.planner import ENCODINGS, Cuts, FrameFormatError, plan_frames

    v = VECTORS[name]
    buf = np.frombuffer(v.stored, dtype=np.uint8)

    def col(x: int) -> np.ndarray:  # one frame as the planner's arrays
        return np.array([x], dtype=np.int64)

    cut = []

    def plan() -> None:
        p = plan_frames(
            buf, col(0), col(len(buf)), col(v.raw_size), col(v.element_size), col(ENCODINGS[v.encoding]), col(0)
        )
        cut.append(Cuts(p, [(0, 1)], col(0)).cut(0, 1, buf))

    try:
        plan()
        got = None
    except FrameFormatError as e:
        assert e.frame == 0
        got = kind_of(str(e))
    assert got == v.planner_expect
    if got is None:  # what the GPU would write, by the host reference of nvCOMP and the plane kernel
        out = np.zeros(v.raw_size, dtype=np.uint8)
        run_plan_on_host(cut[0], buf, out)
        host = bytearray(v.raw_size)
        decode_frame_into(v.stored, v.encoding, v.element_size, memoryview(host))
        assert out.tobytes() == bytes(host)


def _chunked_planes(v: Vector) -> list[memoryview]:
    """The stored bytes of each chunked plane of a layout-2 vector whose plane table is sound."""
    if v.encoding != "zstd-byteplane" or v.stored[:4] != fmt.PLANES_TAG:
        return []
    try:
        table = fmt.plane_table(v.stored, v.element_size, v.raw_size)
    except fmt.FormatError:
        return []
    view = memoryview(v.stored)
    return [view[at : at + size] for mode, at, size in table if mode == fmt.PLANE_ZSTD_CHUNKS]


@pytest.mark.skipif(_planes is None, reason="the C helper runtime_shim.store._planes was not built (no C compiler)")
@pytest.mark.parametrize("name", [name for name, v in VECTORS.items() if _chunked_planes(v)])
def test_c_helper_agrees_plane_by_plane(name: str) -> None:
    v = VECTORS[name]
    n = v.raw_size // v.element_size
    for plane in _chunked_planes(v):
        ref = _outcome(lambda p=plane: fmt.check_chunked_plane(p, n))
        native = _outcome(lambda p=plane: _planes.chunk_run(p, n, fmt.PLANE_CHUNK, fmt.ZSTD_MAX_BLOCKS))
        assert native == ref
        if ref is None:
            assert _planes.chunk_run(plane, n, fmt.PLANE_CHUNK, fmt.ZSTD_MAX_BLOCKS) == fmt.check_chunked_plane(
                plane, n
            )


def _structure(v: Vector) -> list[int]:
    """Offsets in a sound layout-2 vector where damage meets a rule: plane table, chunk tables, chunk headers and
    ends."""
    es = v.element_size
    spots = list(range(fmt.plane_header_size(es)))
    view = memoryview(v.stored)
    for mode, at, size in fmt.plane_table(view, es, v.raw_size):
        if mode == fmt.PLANE_ZSTD_CHUNKS:
            chunks = fmt.plane_chunks(view[at : at + size], v.raw_size // es)
            spots += range(at, at + chunks[0][0])
            for c_at, c_size, _ in chunks:
                spots += range(at + c_at, at + c_at + 12)
                spots += range(at + c_at + c_size - 4, at + c_at + c_size)
    return spots


@pytest.mark.parametrize("name", ["the writer's frame", "two chunks and a short last one", "a chunk of 64 raw blocks"])
def test_one_damaged_byte_is_judged_alike_by_format_the_host_decoder_and_the_planner(impl: str, name: str) -> None:
    from runtime_shim.gpu.planner import ENCODINGS, Cuts, FrameFormatError, plan_frames

    v = VECTORS[name]
    spots = _structure(v)
    rng = np.random.default_rng(len(name))

    def col(x: int) -> np.ndarray:  # one frame as the planner's arrays
        return np.array([x], dtype=np.int64)

    refused = 0
    for trial in range(250):
        bad = bytearray(v.stored)
        if trial % 10 == 9:
            bad = bad[: int(rng.integers(0, len(bad)))]
        else:
            at = spots[int(rng.integers(0, len(spots)))] if rng.random() < 0.8 else int(rng.integers(0, len(bad)))
            bad[at] = int(rng.integers(0, 256))
        stored = bytes(bad)
        want = _outcome(lambda s=stored: fmt.check_frame(s, v.encoding, v.element_size, v.raw_size))
        buf = np.frombuffer(stored, dtype=np.uint8)
        try:
            plan = plan_frames(buf, col(0), col(len(buf)), col(v.raw_size), col(v.element_size), col(ENCODINGS[v.encoding]), col(0))  # fmt: skip
            Cuts(plan, [(0, 1)], col(0)).cut(0, 1, buf)
            planned = None
        except FrameFormatError as e:
            planned = kind_of(str(e))
        assert planned == want, (trial, want, planned)
        if want is not None:  # the host decoder refuses it in the same words; sound structure is zstd's to judge
            refused += 1
            out = memoryview(bytearray(v.raw_size))
            assert _outcome(lambda s=stored, o=out: decode_frame_into(s, v.encoding, v.element_size, o)) == want
    assert refused > 100
