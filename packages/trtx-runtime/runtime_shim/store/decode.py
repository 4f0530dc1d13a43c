"""Decoding one stored weight frame into its raw bytes, with the optional C helper (_planes.c) or numpy.

The format's rules come from format.py; this module only decodes. Every zstd range is checked there before zstd sees
it (so a hostile header cannot make python-zstandard allocate what it promises), and every decoded size is checked.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import zstandard

from .format import (
    ENCODINGS,
    PLANE_CHUNK,
    PLANE_RAW,
    PLANE_ZSTD,
    PLANES_TAG,
    UINT_DTYPES,
    ZSTD_MAX_BLOCKS,
    FormatError,
    check_chunked_plane,
    check_zstd,
    msg_decoded_size,
    msg_not_whole_elements,
    msg_plane_size,
    msg_stored_size,
    plane_table,
)

_built: ModuleType | None
try:  # the optional C helper (packages/trtx-runtime/setup.py)
    _built = importlib.import_module(f"{__package__}._planes")
except ImportError:
    _built = None
# TRTX_SHIM_NATIVE=0 turns the helper off, to rule it out when debugging a decode (use_native does it in code).
_native: ModuleType | None = None if os.environ.get("TRTX_SHIM_NATIVE") == "0" else _built

# Without the helper a byte-plane frame takes Python chunk checks and five numpy passes over memory, between which
# each thread takes the GIL back: past a few threads more threads made decoding slower (bench/README.md, lent
# 16-vCPU H200 host: 2.3-2.9x one thread's speed on 4 threads; 1.6-1.8x on 16 with no limit and 2.0-2.5x with a
# limit of 8). So at most this many threads decode such frames at once (one per physical core, as two vCPUs a core
# is the common case, at most the measured knee of 4); the caller's other work (reading, sha256, plain zstd frames,
# which release the GIL) still runs on every thread. bench/bench_decode.py measures the scaling with and without it.
NUMPY_DECODE_THREADS = max(2, min(4, (os.cpu_count() or 2) // 2))
_numpy_limit = NUMPY_DECODE_THREADS
_numpy_gate = threading.BoundedSemaphore(NUMPY_DECODE_THREADS)
_local = threading.local()


def native_join() -> bool:
    """Whether the C helper (runtime_shim.store._planes) decodes, rather than numpy."""
    return _native is not None


def native_built() -> bool:
    """Whether the C helper was built at install (whatever use_native or TRTX_SHIM_NATIVE say)."""
    return _built is not None


def use_native(enabled: bool) -> bool:
    """Decode with the C helper (where built) or with numpy alone, in this process from now on; returns whether
    the helper was in use before. For benchmarks and tests that compare both; thread-safe between decodes only."""
    global _native
    before = _native is not None
    _native = _built if enabled else None
    return before


def decode_threads(requested: int) -> int:
    """How many threads a pool that decodes byte-plane frames should have: all that were asked for with the C
    helper; without it at most the numpy limit, so that asking for more threads never makes decoding slower (the
    gate below only bounds the numpy passes, while the Python work around them still contends for the GIL)."""
    return requested if _native is not None else max(1, min(requested, _numpy_limit))


def limit_numpy_decoders(threads: int) -> int:
    """Let at most ``threads`` threads decode byte-plane frames with numpy at once (NUMPY_DECODE_THREADS unless
    changed); returns the limit before. For benchmarks looking for the knee; call it between decodes."""
    global _numpy_gate, _numpy_limit
    before, _numpy_limit = _numpy_limit, max(1, threads)
    _numpy_gate = threading.BoundedSemaphore(_numpy_limit)
    return before


def native_helper() -> ModuleType | None:
    """The C helper module while it is in use (its check_chunks serves the GPU planner too), else None."""
    return _native


def thread_dctx() -> zstandard.ZstdDecompressor:
    """This thread's decompression context: a context is not thread-safe, and making one per frame costs more than
    decoding a small frame."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def scratch(kind: str, nbytes: int) -> memoryview:
    """A per-thread reusable buffer of exactly ``nbytes`` (grown as needed), for one use at a time per kind: fresh
    output memory would page-fault on every frame, which serializes threads on the kernel's memory map lock."""
    bufs = _local.__dict__.setdefault("scratch", {})
    buf = bufs.get(kind)
    if buf is None or len(buf) < nbytes:
        buf = bufs[kind] = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
    return memoryview(buf[:nbytes])


def _read_exactly(reader: zstandard.ZstdDecompressionReader, buf: memoryview, what: str) -> None:
    """Fill ``buf`` from a zstd stream reader, which must then be at its end."""
    got = 0
    while got < len(buf):
        step = reader.readinto(buf[got:])
        if not step:
            break
        got += step
    if got == len(buf) and reader.read(1):
        raise FormatError(msg_decoded_size(what, f"more than {got}", len(buf)))
    if got != len(buf):
        raise FormatError(msg_decoded_size(what, got, len(buf)))


def _decode_run(data: memoryview, buf: memoryview, what: str) -> None:
    """Decode zstd frames back to back (checked by format.py first) into ``buf``, which they must fill exactly: one
    call, one GIL release, whatever the number of frames."""
    with thread_dctx().stream_reader(data, read_across_frames=True) as reader:
        _read_exactly(reader, buf, what)


def _decompress_whole(data: memoryview, out: memoryview, what: str = "zstd frame") -> None:
    """Decode one zstd frame (not a chunk: its content size may be missing) that must decode to exactly ``out``;
    bytes after the frame are not read."""
    check_zstd(data, len(out), chunk=False)
    with thread_dctx().stream_reader(data, read_across_frames=False) as reader:
        _read_exactly(reader, out, what)


def decode_chunks(data: memoryview, n: int, buf: memoryview) -> None:
    """Decode a chunked plane (``data``: its table and chunks) into ``buf`` (``n`` bytes): the table and every
    chunk are checked first (by the C helper where it runs, else by format.check_chunked_plane: the same rules and
    words), then the chunks are decoded as one run of zstd frames in one call, which releases the GIL once per plane
    instead of once per 64 KiB chunk; zstd checks each frame's size against its header and the run must fill the
    plane exactly."""
    data = memoryview(data)
    if _native is not None:
        first = _native.chunk_run(data, n, PLANE_CHUNK, ZSTD_MAX_BLOCKS)
    else:
        first = check_chunked_plane(data, n)
    _decode_run(data[first:], buf[:n], "zstd chunks")


def decode_frame_into(stored: bytes | memoryview, encoding: str, element_size: int, out: memoryview) -> None:
    """Decode one stored frame into ``out`` (exactly its raw size). Raises ValueError (FormatError or zstd's)."""
    stored = memoryview(stored)
    if encoding == "none":
        if len(stored) != len(out):
            raise FormatError(msg_stored_size(len(stored), len(out)))
        out[:] = stored
        return
    if encoding not in ENCODINGS:
        raise FormatError(f"unknown encoding {encoding!r}")
    es = element_size if encoding == "zstd-byteplane" else 1
    if es == 1:
        _decompress_whole(stored, out)
    elif _native is not None:
        _decode_split(stored, es, out)
    else:
        with _numpy_gate:
            _decode_split(stored, es, out)


def _decode_split(stored: memoryview, es: int, out: memoryview) -> None:
    """A byte-plane frame of either layout."""
    if bytes(stored[: len(PLANES_TAG)]) == PLANES_TAG:
        _decode_planes(stored, es, out)
        return
    # Layout 1: one zstd frame of the planes, plane k holding byte k of every element, no rotation. One strided column
    # write per plane runs ~5x faster than numpy's generic transposed copy (measured, 4 MiB frames).
    if len(out) % es:
        raise FormatError(msg_not_whole_elements(len(out), es))
    raw = scratch("layout1", len(out))
    _decompress_whole(stored, raw)
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(es, -1)
    elements = np.frombuffer(out, dtype=np.uint8).reshape(-1, es)
    for k in range(es):
        elements[:, k] = planes[k]


def _decode_planes(stored: memoryview, es: int, out: memoryview) -> None:
    """Layout 2: decode each plane (raw or zstd), interleave them and rotate the sign bit back, in whole-array passes."""
    n = len(out) // es
    planes = []
    for k, (mode, pos, size) in enumerate(plane_table(stored, es, len(out))):
        data = stored[pos : pos + size]
        if mode == PLANE_RAW:
            plane = data
        elif mode == PLANE_ZSTD:
            plane = scratch(f"plane{k}", n)
            _decompress_whole(data, plane, f"plane {k}")
        else:
            plane = scratch(f"plane{k}", n)
            decode_chunks(data, n, plane)
        if len(plane) != n:
            raise FormatError(msg_plane_size(k, len(plane), n))
        planes.append(np.frombuffer(plane, dtype=np.uint8))
    join_rotated(out, planes)


def join_rotated(out: memoryview, planes: Sequence[np.ndarray]) -> None:
    """Interleave byte planes (least significant first) into ``out`` and rotate each element right by one bit: the
    elements were rotated left before the split, so the sign bit became bit 0 and the top plane holds the exponent
    alone. The compiled helper does it in one pass with the GIL released; numpy needs five passes."""
    if _native is not None:
        _native.join_rotated(out, planes)
        return
    es = len(planes)
    n = len(out) // es
    u = np.dtype(UINT_DTYPES[es])
    x = np.frombuffer(out, dtype=u)
    tmp = np.frombuffer(scratch("tmp", n * es), dtype=u)
    np.left_shift(planes[es - 1], 8 * (es - 1), out=x, dtype=u)
    for k in range(es - 2, 0, -1):
        np.left_shift(planes[k], 8 * k, out=tmp, dtype=u)
        x |= tmp
    np.bitwise_or(x, planes[0], out=x, dtype=u)
    np.right_shift(x, 1, out=tmp)
    np.left_shift(x, 8 * es - 1, out=x)
    x |= tmp
