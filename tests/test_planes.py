"""The host decoder's byte-plane join (the optional C helper and its numpy fallback) and its chunked-plane reader."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from bundler.store_writer import encode_frame
from runtime_shim.store.decode import decode_frame_into, join_rotated, native_join
from runtime_shim.store.format import PLANE_CHUNK, PLANE_RAW, PLANE_ZSTD_CHUNKS, PLANES_TAG

try:
    from runtime_shim.store import _planes
except ImportError:
    _planes = None

needs_native = pytest.mark.skipif(
    _planes is None, reason="the C helper runtime_shim.store._planes was not built (no C compiler at install)"
)


def _reference(planes: list[np.ndarray]) -> bytes:
    """Join and rotate with Python integers, element by element: slow and obviously right."""
    es, out = len(planes), bytearray()
    bits = 8 * es
    for i in range(len(planes[0])):
        x = sum(int(p[i]) << (8 * k) for k, p in enumerate(planes))
        x = (x >> 1) | ((x & 1) << (bits - 1))
        out += x.to_bytes(es, "little")
    return bytes(out)


@pytest.mark.parametrize("es", [2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_join_matches_element_by_element_rotation(impl, es, n) -> None:
    rng = np.random.default_rng(es * 1000 + n)
    planes = [rng.integers(0, 256, n, dtype=np.uint8) for _ in range(es)]
    store = bytearray(n * es + 1)
    out = memoryview(store)[1:]  # an odd address: nothing may assume the output is aligned to the element size
    join_rotated(out, planes)
    assert bytes(out) == _reference(planes)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_a_chunked_frame_round_trips_with_either_join(impl, dtype) -> None:
    values = (np.random.default_rng(3).standard_normal(300_000) * 0.05).astype(dtype)
    es = values.itemsize
    stored = encode_frame(values.tobytes(), "zstd-byteplane", es, 3)
    assert PLANE_ZSTD_CHUNKS in [stored[4 + 5 * k] for k in range(es)], "the exponent plane should be chunked"
    out = bytearray(values.nbytes)
    decode_frame_into(stored, "zstd-byteplane", es, memoryview(out))
    assert bytes(out) == values.tobytes()


@needs_native
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: _planes.join_rotated(bytearray(6), [b"ab", b"cd", b"ef"]), "3 planes: expected 2, 4 or 8"),
        (lambda: _planes.join_rotated(bytearray(5), [b"ab", b"cd"]), "not a multiple of 2 planes"),
        (lambda: _planes.join_rotated(bytearray(4), [b"ab", b"c"]), "plane 1 has 1 bytes, expected 2"),
        (lambda: _planes.join_rotated(b"abcd", [b"ab", b"cd"]), "writable|read-only"),
    ],
)
def test_the_native_join_refuses_wrong_shapes(call, message) -> None:
    with pytest.raises((ValueError, TypeError, BufferError), match=message):
        call()


@needs_native
def test_the_native_join_refuses_a_plane_inside_its_output() -> None:
    buf = bytearray(8)
    view = memoryview(buf)
    with pytest.raises(ValueError, match="plane 1 overlaps out"):
        _planes.join_rotated(view, [b"abcd", view[4:]])
    assert bytes(buf) == bytes(8)


def _decode(stored: bytes | bytearray, values: np.ndarray) -> bytes:
    out = bytearray(values.nbytes)
    decode_frame_into(bytes(stored), "zstd-byteplane", 4, memoryview(out))
    return bytes(out)


def _refused(impl: str, message: str):
    """The C helper and, without it, format.check_chunked_plane check chunk headers before decoding, in the same
    words (the reader turns either into an IntegrityError naming the file and frame)."""
    return pytest.raises(ValueError, match=message)


def test_chunks_are_read_where_the_table_puts_them_and_nowhere_else(impl, chunked_frame) -> None:
    values, stored, table = chunked_frame
    stored = bytearray(stored)
    assert _decode(stored, values) == values.tobytes()
    count = struct.unpack_from("<I", stored, table + 4)[0]
    a, b = struct.unpack_from("<II", stored, table + 8)
    assert count == 2 and a != b
    struct.pack_into("<II", stored, table + 8, b, a)  # same total, so the run of frames alone would still decode
    with _refused(impl, "is not one zstd frame of at most 64 blocks that ends with the chunk's"):
        _decode(stored, values)


@pytest.mark.parametrize(
    "where, byte, message",
    [
        (0, 0x00, "does not start with zstd's magic number"),
        (4, 0x61, "needs a dictionary"),  # frame header descriptor: dictionary id flag set
    ],
)
def test_a_damaged_chunk_header_is_refused_before_decoding(impl, chunked_frame, where, byte, message) -> None:
    values, stored, table = chunked_frame
    stored = bytearray(stored)
    first = table + 8 + 4 * 2
    stored[first + where] = byte
    with _refused(impl, message):
        _decode(stored, values)


def test_a_chunk_that_promises_another_size_is_refused(impl, chunked_frame) -> None:
    values, stored, table = chunked_frame
    stored = bytearray(stored)
    first = table + 8 + 4 * 2
    fhd = stored[first + 4]
    assert fhd >> 6 == 1, "a 64 KiB chunk carries a 2-byte content size (stored as size - 256)"
    at = first + 5 + (1 - ((fhd >> 5) & 1))
    struct.pack_into("<H", stored, at, struct.unpack_from("<H", stored, at)[0] - 1)
    with _refused(impl, "decodes to 65535 bytes, 65536 planned"):
        _decode(stored, values)


def test_the_environment_can_turn_the_native_join_off() -> None:
    code = "from runtime_shim.store.reader import native_join; print(native_join())"
    env = dict(os.environ, TRTX_SHIM_NATIVE="0")
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_ci_builds_the_native_join() -> None:
    # .ci/run sets TRTX_REQUIRE_NATIVE: there a missing build must fail rather than leave the C helper untested.
    if os.environ.get("TRTX_REQUIRE_NATIVE") != "1":
        pytest.skip("TRTX_REQUIRE_NATIVE is not set (only .ci/run requires the C helper)")
    assert _planes is not None, "runtime_shim.store._planes was not built; is a C compiler installed?"
    assert native_join()


def test_random_damage_to_a_chunked_frame_is_refused_or_decodes_never_crashes(impl, chunked_frame) -> None:
    # The C helper parses the chunk table and headers of bytes that may be hostile: whatever a damaged frame
    # holds, either way must end in a clean error or a full-size result, never a crash or a short write.
    values, stored, table = chunked_frame
    rng = np.random.default_rng(11)
    outcomes = {"refused": 0, "decoded": 0}
    for _ in range(400):
        bad = bytearray(stored)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(bad))) if rng.random() < 0.5 else table + int(rng.integers(0, 40))
            bad[at] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            bad = bad[: int(rng.integers(0, len(bad)))]
        out = bytearray(values.nbytes)
        try:
            decode_frame_into(bytes(bad), "zstd-byteplane", 4, memoryview(out))
            outcomes["decoded"] += 1
        except (ValueError, zstandard.ZstdError):
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100  # the damage mostly lands where it must be caught


def _promising(size: int) -> bytes:
    """A zstd frame of 1000 bytes of 'a' whose header promises ``size`` bytes instead (an 8-byte content size)."""
    frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(b"a" * 1000)
    fhd = frame[4]
    assert fhd >> 6 == 0 and not (fhd >> 5) & 1, "expected a header with no content size and a window byte"
    return (
        frame[:4] + bytes([0xE0]) + struct.pack("<Q", size) + frame[6:]
    )  # single segment, 8-byte size, no window byte


def test_a_zstd_frame_promising_a_terabyte_is_refused_before_anything_is_allocated() -> None:
    # python-zstandard allocates what a header promises: unchecked, this raised MemoryError (or took gigabytes)
    with pytest.raises(ValueError, match="decodes to 1099511627776 bytes, 1000 planned"):
        decode_frame_into(_promising(1 << 40), "zstd", 1, memoryview(bytearray(1000)))


def test_a_chunk_promising_a_terabyte_is_refused_either_way(impl) -> None:
    chunk = _promising(1 << 40)
    table = struct.pack("<III", PLANE_CHUNK, 1, len(chunk)) + chunk
    stored = PLANES_TAG + struct.pack("<BIBI", PLANE_RAW, 1000, PLANE_ZSTD_CHUNKS, len(table)) + b"\x00" * 1000 + table
    with pytest.raises(ValueError, match="1099511627776 bytes"):
        decode_frame_into(stored, "zstd-byteplane", 2, memoryview(bytearray(2000)))


# Crafted planes on which a run of frames (the host with the C helper) and chunk-by-chunk decoding (the GPU, the
# numpy fallback) would read different bytes, or one would accept what another refuses: all three must refuse.
_MAGIC = struct.pack("<I", 0xFD2FB528)


def _raw_frame(content: bytes) -> bytes:
    """One zstd frame of one raw block: single segment, 4-byte content size."""
    return _MAGIC + b"\xa0" + struct.pack("<I", len(content)) + struct.pack("<I", len(content) << 3 | 1)[:3] + content


def _rle_frame(byte: int, size: int) -> bytes:
    return _MAGIC + b"\xa0" + struct.pack("<I", size) + struct.pack("<I", size << 3 | 2 | 1)[:3] + bytes([byte])


def _skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(payload)) + payload


def _two_chunk_frame(chunks: bytes, sizes: list[int]) -> bytes:
    n = 2 * PLANE_CHUNK
    plane = struct.pack("<II", PLANE_CHUNK, len(sizes)) + struct.pack(f"<{len(sizes)}I", *sizes) + chunks
    return PLANES_TAG + struct.pack("<BIBI", PLANE_RAW, n, PLANE_ZSTD_CHUNKS, len(plane)) + bytes(n) + plane


_F0, _F1 = _raw_frame(b"\x11" * PLANE_CHUNK), _raw_frame(b"\x22" * PLANE_CHUNK)
_HIDDEN = _skippable(_rle_frame(0x77, PLANE_CHUNK))  # a frame the run skips over, where chunk 1 is said to start
_NO_SIZE = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x11" * PLANE_CHUNK)
CRAFTED = {
    "skippable frame after chunk 0's frame": _two_chunk_frame(
        _F0 + _skippable(b"junk") + _F1, [len(_F0) + 12, len(_F1)]
    ),
    "chunk 1 planned inside a skippable frame": _two_chunk_frame(
        _F0 + _HIDDEN + _F1, [len(_F0) + 8, len(_HIDDEN) - 8 + len(_F1)]
    ),
    "chunks that do not say their size": _two_chunk_frame(_NO_SIZE * 2, [len(_NO_SIZE)] * 2),
}


def _planned_for_the_gpu(stored: bytes, raw: int):
    """What the GPU decoder would be given for one byte-plane frame of element size 2: planned, then cut for the
    segment holding it (where every zstd chunk is checked)."""
    from runtime_shim.gpu.planner import ENCODINGS, Cuts, plan_frames

    buf = np.frombuffer(stored, dtype=np.uint8)

    def one(v: int) -> np.ndarray:
        return np.array([v], dtype=np.int64)

    plan = plan_frames(buf, one(0), one(len(stored)), one(raw), one(2), one(ENCODINGS["zstd-byteplane"]), one(0))
    return Cuts(plan, [(0, 1)], one(0)).cut(0, 1, buf)


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_chunk_runs_are_refused_by_both_host_paths_and_the_gpu_planner(impl, case) -> None:
    from runtime_shim.gpu.planner import FrameFormatError

    stored = CRAFTED[case]
    n = 2 * PLANE_CHUNK
    with pytest.raises((ValueError, zstandard.ZstdError)):
        decode_frame_into(stored, "zstd-byteplane", 2, memoryview(bytearray(2 * n)))
    with pytest.raises(FrameFormatError):
        _planned_for_the_gpu(stored, 2 * n)


def test_the_crafted_runs_are_sound_once_their_chunks_are_honest(impl) -> None:
    # the same frames, tabled where they really are, decode on every path: the refusals above are about the table
    stored = _two_chunk_frame(_F0 + _F1, [len(_F0), len(_F1)])
    out = bytearray(4 * PLANE_CHUNK)
    decode_frame_into(stored, "zstd-byteplane", 2, memoryview(out))
    hi = np.frombuffer(bytes(out), dtype="<u2") >> 7 & 0xFF  # the chunked plane is byte 1 of each element, rotated
    assert set(hi[:PLANE_CHUNK].tolist()) == {0x11} and set(hi[PLANE_CHUNK:].tolist()) == {0x22}


def _blocks_frame(pieces: list[bytes]) -> bytes:
    """One zstd frame of several raw blocks (legal zstd, though the writer makes one block per chunk)."""
    size = sum(len(p) for p in pieces)
    body = b"".join(struct.pack("<I", len(p) << 3 | (k == len(pieces) - 1))[:3] + p for k, p in enumerate(pieces))
    return _MAGIC + b"\xa0" + struct.pack("<I", size) + body


@pytest.mark.parametrize("blocks, accepted", [(3, True), (64, True), (65, False)])
def test_a_chunk_of_several_blocks_is_walked_to_its_end(impl, blocks, accepted) -> None:
    from runtime_shim.gpu.planner import FrameFormatError

    step = -(-PLANE_CHUNK // blocks)
    content = bytes(range(256)) * (PLANE_CHUNK // 256)
    f0 = _blocks_frame([content[i : i + step] for i in range(0, PLANE_CHUNK, step)])
    stored = _two_chunk_frame(f0 + _F1, [len(f0), len(_F1)])
    n = 2 * PLANE_CHUNK
    out = bytearray(2 * n)

    def plan() -> object:
        return _planned_for_the_gpu(stored, 2 * n)

    if accepted:
        decode_frame_into(stored, "zstd-byteplane", 2, memoryview(out))
        hi = (np.frombuffer(bytes(out), dtype="<u2") >> 7 & 0xFF).astype(np.uint8)  # the chunked plane, rotated back
        assert hi.tobytes() == content + b"\x22" * PLANE_CHUNK
    else:
        with pytest.raises(ValueError, match="at most 64 blocks"):
            decode_frame_into(stored, "zstd-byteplane", 2, memoryview(out))
    if accepted:
        plan()
    else:
        with pytest.raises(FrameFormatError, match="at most 64 blocks"):
            plan()


def test_without_the_c_helper_at_most_the_limit_of_threads_decode_byte_planes_at_once(monkeypatch) -> None:
    # more numpy decoders than the knee made decoding slower: the others wait (reading and hashing go on meanwhile)
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from runtime_shim.store import decode

    values = (np.random.default_rng(4).standard_normal(20_000) * 0.05).astype(np.float32)
    stored = encode_frame(values.tobytes(), "zstd-byteplane", 4, 3)
    inside = most = 0
    lock = threading.Lock()
    real = decode._decode_planes

    def watched(*args) -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.01)  # long enough for the other threads to arrive
        real(*args)
        with lock:
            inside -= 1

    monkeypatch.setattr(decode, "_decode_planes", watched)
    was, limit = decode.use_native(False), decode.limit_numpy_decoders(2)
    try:
        outs = [bytearray(values.nbytes) for _ in range(12)]
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda out: decode_frame_into(stored, "zstd-byteplane", 4, memoryview(out)), outs))
    finally:
        decode.use_native(was)
        decode.limit_numpy_decoders(limit)
    assert all(bytes(out) == values.tobytes() for out in outs)
    assert 1 <= most <= 2
