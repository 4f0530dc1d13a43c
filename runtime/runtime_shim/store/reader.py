"""Weight store reader: streams, verifies and decodes the frames of a bundle's weight file (format: docs/WEIGHT_STORE.md).

Shim side: stdlib + numpy + zstandard only (ml_dtypes is used for bfloat16/float8 when importable). Every frame's
stored bytes are checked against the manifest's sha256 before they are decoded, and every decoded size is checked,
so a tampered or truncated file fails with an IntegrityError naming the file, the blob, its tensors and the frame.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import zstandard

from ..errors import IntegrityError
from ..fsutil import atomic_writer, sha256_bytes
from ..manifest import Blob, WeightStore

try:  # the optional C helper (setup.py); TRTX_SHIM_NATIVE=0 turns it off to rule it out when debugging a decode
    from . import _planes as _native
except ImportError:
    _native = None
if os.environ.get("TRTX_SHIM_NATIVE") == "0":
    _native = None

MAGIC = b"TRTXW\x00\x01\x00"  # "TRTXW", NUL, format version 1, reserved
HINT_CORRUPT = "the bundle's weight file is damaged or was modified; fetch the bundle again ('trtx-bundle verify' lists every bad file)"

# Bytes per element as stored; int4/uint4 pack two elements per byte (see nbytes_for).
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "bool": 1,
    "float8e4m3fn": 1,
    "int4": 1,
    "uint4": 1,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # the ones a byte-plane split helps


def nbytes_for(dtype: str, shape: Iterable[int]) -> int:
    """Raw size of a tensor: little-endian elements, int4/uint4 packed two per byte (ONNX's layout)."""
    count = 1
    for d in shape:
        count *= int(d)
    return (count + 1) // 2 if dtype in ("int4", "uint4") else count * ITEMSIZE[dtype]


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a tensor is returned as.

    bfloat16 and float8e4m3fn use ml_dtypes when it is importable, else their bit patterns (uint16 / uint8);
    int4/uint4 come back as their packed bytes (uint8, two elements a byte, low nibble first), which is the layout
    TensorRT refit expects anyway.
    """
    if dtype in ("bfloat16", "float8e4m3fn"):
        try:
            import ml_dtypes
        except ImportError:
            return np.dtype(np.uint16 if dtype == "bfloat16" else np.uint8)
        return np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else ml_dtypes.float8_e4m3fn)
    if dtype in ("int4", "uint4"):
        return np.dtype(np.uint8)
    return np.dtype(dtype).newbyteorder("<")


# --------------------------------------------------------------------------- one frame
# zstd-byteplane frames, layout 2 (docs/WEIGHT_STORE.md): this tag, then per plane (u8 mode, u32 LE stored size),
# then the planes' stored bytes. A frame of layout 1 is one plain zstd frame, which starts with zstd's magic instead.
PLANES_TAG = b"BP2\x00"
# Plane modes: 0 raw; 1 one zstd frame (read, no longer written); 2 a run of independent zstd frames, each decoding to
# PLANE_CHUNK bytes of the plane (the last one to the rest), after a table of their sizes: a GPU decoder (nvCOMP) runs
# one chunk per thread block, so a 2 MiB plane in one frame would decode serially (bench/README.md, GPU decode).
PLANE_RAW, PLANE_ZSTD, PLANE_ZSTD_CHUNKS = 0, 1, 2
PLANE_CHUNK = 64 << 10
# A chunk is one zstd frame of at most this many blocks (the writer's are one block each): both decoders walk the
# block headers to check that the frame ends with its chunk, and the GPU planner does so in this many vectorized steps.
ZSTD_MAX_BLOCKS = 64
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_local = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    # One decompression context per thread: a context is not thread-safe, and making one per frame costs more
    # than decoding a small frame.
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def _decompress_into(data: memoryview, buf: memoryview) -> memoryview:
    """Decode one zstd frame into a reused buffer (fresh output memory would page-fault on every frame, which
    serializes threads on the kernel's memory map lock); returns the part written."""
    pos = 0
    with _dctx().stream_reader(data, read_across_frames=False) as reader:
        while pos < len(buf):
            got = reader.readinto(buf[pos:])
            if not got:
                break
            pos += got
        if pos == len(buf) and reader.read(1):
            raise ValueError(f"zstd frame decodes to more than {len(buf)} bytes")
    return buf[:pos]


def _decompress_exact(data: bytes | memoryview, size: int, *, chunk: bool = False, what: str = "zstd frame") -> bytes:
    """Decode one zstd frame that must decode to exactly ``size`` bytes. python-zstandard allocates whatever size the
    frame's header promises before decoding (max_output_size only bounds frames that do not say), so a damaged or
    hostile header is refused here before it can ask for gigabytes (or raise MemoryError instead of an error
    that names the frame). ``chunk``: a plane's chunk, which must also say its size and be nothing but that one
    frame, as the C helper and the GPU planner require."""
    promised = zstandard.frame_content_size(data)
    if chunk and promised == -1:
        raise ValueError(f"{what} does not say its decoded size")
    if promised not in (-1, size):
        raise ValueError(f"{what} says it decodes to {promised} bytes, expected {size}")
    raw = _dctx().decompress(data, max_output_size=size, allow_extra_data=not chunk)
    if len(raw) != size:
        raise ValueError(f"{what} decodes to {len(raw)} bytes, expected {size}")
    return raw


def _scratch(kind: str, nbytes: int) -> memoryview:
    """A per-thread reusable buffer of exactly ``nbytes`` (grown as needed), for one use at a time per kind."""
    bufs = _local.__dict__.setdefault("scratch", {})
    buf = bufs.get(kind)
    if buf is None or len(buf) < nbytes:
        buf = bufs[kind] = np.empty(max(nbytes, 1 << 16), dtype=np.uint8)
    return memoryview(buf[:nbytes])


def decode_frame_into(stored: bytes | memoryview, encoding: str, element_size: int, out: memoryview) -> None:
    """Decode one stored frame into ``out`` (exactly its raw size). Raises ValueError if the sizes disagree."""
    if encoding == "none":
        if len(stored) != len(out):
            raise ValueError(f"stored {len(stored)} bytes, expected {len(out)}")
        out[:] = stored
        return
    if encoding not in ("zstd", "zstd-byteplane"):
        raise ValueError(f"unknown encoding {encoding!r}")
    if encoding == "zstd-byteplane" and element_size > 1 and bytes(stored[:4]) == PLANES_TAG:
        _decode_planes(memoryview(stored), element_size, out)
        return
    raw = _decompress_exact(stored, len(out))
    if encoding == "zstd" or element_size == 1:
        out[:] = raw
    else:
        # Layout 1: planes[k] holds byte k of every element, no rotation. One strided column write per plane
        # runs ~5x faster than numpy's generic transposed copy (measured, 4 MiB frames).
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(element_size, -1)
        elements = np.frombuffer(out, dtype=np.uint8).reshape(-1, element_size)
        for k in range(element_size):
            elements[:, k] = planes[k]


def plane_table(stored: bytes | memoryview, element_size: int, raw_size: int) -> list[tuple[int, int, int]]:
    """Parse a layout-2 frame's header: ``(mode, offset in the frame, stored size)`` per plane, checked against
    the frame's length and raw size (each plane holds ``raw_size / element_size`` bytes once decoded).

    Shared by the host decoder below and the GPU decoder (runtime_shim.gpu_decode), which must never hand a
    decoder a range outside the frame. Raises ValueError.
    """
    es = element_size
    if es not in _UINT:
        raise ValueError(f"element size {es}: expected 2, 4 or 8")
    if raw_size % es:
        raise ValueError(f"raw size {raw_size} is not a multiple of the element size {es}")
    head = 4 + 5 * es
    if len(stored) < head:
        raise ValueError(f"frame of {len(stored)} bytes is shorter than its plane header ({head} bytes)")
    fields = struct.unpack_from("<" + "BI" * es, stored, 4)
    table, pos, n = [], head, raw_size // es
    for k in range(es):
        mode, size = fields[2 * k], fields[2 * k + 1]
        if mode not in (PLANE_RAW, PLANE_ZSTD, PLANE_ZSTD_CHUNKS):
            raise ValueError(f"plane {k}: unknown mode {mode}")
        if pos + size > len(stored):
            raise ValueError(f"plane {k}: {size} bytes announced, {max(0, len(stored) - pos)} left in the frame")
        if mode == PLANE_RAW and size != n:
            raise ValueError(f"plane {k} decodes to {size} bytes, expected {n}")
        table.append((mode, pos, size))
        pos += size
    if pos != len(stored):
        raise ValueError(f"{len(stored) - pos} bytes after the last plane")
    return table


def plane_chunks(data: bytes | memoryview, plane_bytes: int) -> list[tuple[int, int, int]]:
    """Parse a mode-2 plane (u32 LE chunk raw size, u32 LE count, count x u32 LE stored size, then the zstd frames):
    ``(offset in data, stored size, decoded size)`` per chunk, checked against the data's length and the plane's size.
    Raises ValueError."""
    if len(data) < 8:
        raise ValueError(f"chunked plane of {len(data)} bytes is shorter than its 8-byte table header")
    sub, count = struct.unpack_from("<II", data, 0)
    # chunks of at least PLANE_CHUNK: readers may size their chunk arrays by it (gpu_upload does)
    if sub < PLANE_CHUNK or count != -(-plane_bytes // sub):
        raise ValueError(
            f"chunk table says {count} chunks of {sub} bytes for a plane of {plane_bytes} bytes "
            f"(expected chunks of at least {PLANE_CHUNK} bytes covering the plane)"
        )
    pos = 8 + 4 * count
    if pos > len(data):
        raise ValueError(f"chunk table of {count} entries does not fit the plane's {len(data)} bytes")
    out = []
    for k, size in enumerate(struct.unpack_from(f"<{count}I", data, 8)):
        out.append((pos, size, min(sub, plane_bytes - k * sub)))
        pos += size
    if pos != len(data):
        raise ValueError(f"chunks add up to {pos} bytes, the plane has {len(data)}")
    return out


def _decode_chunks(data: memoryview, n: int, buf: memoryview) -> None:
    """Decode a mode-2 plane (``data``: its table and chunks) into ``buf`` (``n`` bytes).

    With the C helper: the table and every chunk are checked first (at its planned offset a zstd frame with no
    dictionary that says it decodes to the chunk's planned size, whose block headers lead exactly to the chunk's
    end: what the GPU planner checks), then the chunks are decoded as one run of zstd frames in one call, which
    releases the GIL once per plane instead of once per 64 KiB chunk; zstd checks each frame's size against its
    header and the run must fill the plane exactly. Without it: chunk by chunk, each required to be exactly one
    zstd frame that says its size and decodes to it (checking the headers in numpy first would hold the GIL longer
    than this loop does). The one difference: this path does not count blocks (the others refuse a frame of more
    than ZSTD_MAX_BLOCKS), so it may decode a plane they refuse, never one differently.
    """
    if _native is None:
        pos = 0
        for c, (at, csize, craw) in enumerate(plane_chunks(data, n)):
            buf[pos : pos + craw] = _decompress_exact(data[at : at + csize], craw, chunk=True, what=f"chunk {c}")
            pos += craw
        return
    first = _native.chunk_run(data, n, PLANE_CHUNK)
    with _dctx().stream_reader(data[first:], read_across_frames=True) as reader:
        got = reader.readinto(buf) if n else 0
        if got != n or reader.read(1):
            raise ValueError(f"zstd chunks decode to {'more than ' if got == n else ''}{got} bytes, expected {n}")


def _decode_planes(stored: memoryview, element_size: int, out: memoryview) -> None:
    """Layout 2: decode each plane (raw or zstd), interleave them and rotate the sign bit back, in whole-array passes."""
    es = element_size
    table = plane_table(stored, es, len(out))
    n = len(out) // es
    planes = []
    for k, (mode, pos, size) in enumerate(table):
        data = stored[pos : pos + size]
        if mode == PLANE_RAW:
            plane = data
        elif mode == PLANE_ZSTD:
            plane = _decompress_into(data, _scratch(f"plane{k}", n))
        else:
            plane = _scratch(f"plane{k}", n)
            _decode_chunks(data, n, plane)
        if len(plane) != n:
            raise ValueError(f"plane {k} decodes to {len(plane)} bytes, expected {n}")
        planes.append(np.frombuffer(plane, dtype=np.uint8))
    join_rotated(out, planes)


def native_join() -> bool:
    """Whether the byte planes are joined by the compiled helper (runtime_shim._planes) rather than numpy."""
    return _native is not None


def join_rotated(out: memoryview, planes: Sequence[np.ndarray]) -> None:
    """Interleave byte planes (least significant first) into ``out`` and rotate each element right by one bit: the
    elements were rotated left before the split, so the sign bit became bit 0 and the top plane holds the exponent
    alone. The compiled helper does it in one pass with the GIL released; numpy needs five passes."""
    if _native is not None:
        _native.join_rotated(out, planes)
        return
    es = len(planes)
    n = len(out) // es
    u = _UINT[es]
    x = np.frombuffer(out, dtype=u)
    tmp = np.frombuffer(_scratch("tmp", n * es), dtype=u)
    np.left_shift(planes[es - 1], 8 * (es - 1), out=x, dtype=u)
    for k in range(es - 2, 0, -1):
        np.left_shift(planes[k], 8 * k, out=tmp, dtype=u)
        x |= tmp
    np.bitwise_or(x, planes[0], out=x, dtype=u)
    np.right_shift(x, 1, out=tmp)
    np.left_shift(x, 8 * es - 1, out=x)
    x |= tmp


# Raw bytes of frames per task on the reader's threads (iter_blobs): per-task costs on the calling thread (submit,
# settle, with 16 busy threads contending for the GIL) were paid per frame, and most frames of a model's small tensors
# are small. A small model gets smaller tasks, down to TASK_RAW_MIN, so that every thread still has some.
TASK_RAW = 4 << 20
TASK_RAW_MIN = 256 << 10


class WeightReader:
    """Reads the weight store of one bundle. Thread pools are per call; the reader holds one open file."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        store: WeightStore,
        *,
        threads: int | None = None,
        verify_raw: bool = False,
        verify_frames: bool = True,
    ) -> None:
        """``verify_raw`` also checks each decoded blob against its raw sha256 (frame hashes already cover the stored bytes).

        ``verify_frames=False`` skips the per-frame sha256 (sizes and decoding are still checked). SHA-256 is most of
        a load's CPU time (~1 GB/s a core), so this is for callers that have verified ``weights.file.sha256`` of this
        very file themselves, e.g. once at install, and can tell it has not changed since; never the default.
        """
        self.store = store
        self.verify_frames = verify_frames
        self.path = Path(bundle_dir) / store.file.path
        self.threads = max(1, threads if threads is not None else min(8, os.cpu_count() or 1))
        self.verify_raw = verify_raw
        self._lock = threading.Lock()  # for seek+read where os.pread is missing (Windows)
        self._names: dict[int, list[str]] = collections.defaultdict(list)
        for t in store.tensors:
            self._names[t.blob].append(t.name)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise IntegrityError(
                f"{self.path}: weight file missing (pinned by the manifest's weights.file)", hint=HINT_CORRUPT
            ) from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size != store.file.size:
                raise IntegrityError(
                    f"{self.path}: size {size} bytes, expected {store.file.size} (weights.file.size); truncated or replaced",
                    hint=HINT_CORRUPT,
                )
            head = self._file.read(len(MAGIC))
            if head != MAGIC:
                raise IntegrityError(
                    f"{self.path}: does not start with the weight store magic {MAGIC!r} (got {head!r}); not a trtx weight file",
                    hint=HINT_CORRUPT,
                )
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- low level
    def _what(self, index: int) -> str:
        names = self._names.get(index, [])
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"blob {index} (tensor {shown or 'none'})"

    def _read_into(self, offset: int, buf: memoryview) -> int:
        """Read ``len(buf)`` bytes at ``offset`` straight into ``buf`` (no intermediate bytes object); returns the count."""
        if hasattr(os, "preadv"):
            return os.preadv(self._file.fileno(), [buf], offset)
        with self._lock:  # pragma: no cover - Windows
            self._file.seek(offset)
            return self._file.readinto(buf)

    def _where(self, index: int, j: int) -> str:
        frame = self.store.blobs[index].frames[j]
        return f"{self.path}: {self._what(index)}, frame {j} (file offset {frame.offset}, {frame.size} bytes)"

    def _read_stored(self, index: int, j: int, stored: memoryview) -> None:
        self._check_stored(index, j, stored, self._read_into(self.store.blobs[index].frames[j].offset, stored))

    def _check_stored(self, index: int, j: int, stored: memoryview, got: int) -> None:
        """``stored`` holds frame j of blob index as read, of which ``got`` bytes came from the file: all of it, and
        (unless verify_frames is off) its pinned sha256."""
        frame = self.store.blobs[index].frames[j]
        if got < frame.size:
            raise IntegrityError(
                f"{self._where(index, j)}: file ends after {max(0, got)} bytes of it; truncated", hint=HINT_CORRUPT
            )
        if self.verify_frames:
            actual = sha256_bytes(stored)
            if actual != frame.sha256:
                raise IntegrityError(
                    f"{self._where(index, j)}: sha256 {actual}, expected {frame.sha256}", hint=HINT_CORRUPT
                )

    def _decode_frame(self, index: int, j: int, out: memoryview) -> None:
        blob = self.store.blobs[index]
        frame = blob.frames[j]
        # "none" frames are read into their final place and hashed there; others into a per-thread scratch buffer
        # (reused across frames: no allocation, no page faults per frame).
        plain = blob.encoding == "none" and frame.size == len(out)
        stored = out if plain else _scratch("stored", frame.size)
        self._read_stored(index, j, stored)
        if plain:
            return
        try:
            decode_frame_into(stored, blob.encoding, blob.element_size, out)
        except (ValueError, zstandard.ZstdError) as e:
            raise IntegrityError(
                f"{self._where(index, j)}: cannot decode as {blob.encoding} ({e})", hint=HINT_CORRUPT
            ) from None

    def _frame_slices(self, index: int, out: memoryview) -> list[tuple[int, memoryview]]:
        blob = self.store.blobs[index]
        if len(out) != blob.nbytes:
            raise ValueError(f"buffer for {self._what(index)} has {len(out)} bytes, expected {blob.nbytes}")
        slices, pos = [], 0
        for j, f in enumerate(blob.frames):
            slices.append((j, out[pos : pos + f.raw_size]))
            pos += f.raw_size
        return slices

    def _check_raw(self, index: int, out: memoryview) -> None:
        if self.verify_raw:
            blob = self.store.blobs[index]
            actual = sha256_bytes(out)
            if actual != blob.sha256:
                raise IntegrityError(
                    f"{self.path}: {self._what(index)} decodes to sha256 {actual}, expected {blob.sha256}",
                    hint=HINT_CORRUPT,
                )

    # ----------------------------------------------------------------------- public
    def decode_frame(self, index: int, j: int, out: memoryview) -> None:
        """Read, verify (sha256) and decode frame ``j`` of blob ``index`` into ``out`` (exactly its raw_size bytes).

        The unit of work for pipelines that place frames themselves (runtime_shim.gpu_upload); thread-safe.
        """
        self._decode_frame(index, j, memoryview(out).cast("B"))

    def mapped(self) -> np.ndarray:
        """The whole weight file as a read-only uint8 array over a memory map (pages are read as touched; the map
        goes when the array does): for reading many small scattered pieces at once (frame headers, for
        gpu_upload's planner). Nothing is verified. The size is checked first: a mapped file cut short kills the
        process on access (SIGBUS), where a read would just come back short."""
        size = os.fstat(self._file.fileno()).st_size
        if size != self.store.file.size:
            raise IntegrityError(
                f"{self.path}: size {size} bytes, expected {self.store.file.size} (weights.file.size); it changed while open",
                hint=HINT_CORRUPT,
            )
        return np.frombuffer(mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ), dtype=np.uint8)

    def identity(self) -> os.stat_result:
        """fstat of the open weight file: what it is now, whatever its path points to (see UserCache.is_verified)."""
        return os.fstat(self._file.fileno())

    def read_frames(self, frames: Sequence[tuple[int, int]], out: memoryview) -> None:
        """Read frames that lie back to back in the file (``(blob, frame)`` pairs, in file order) as stored into
        ``out`` with one read, and verify each one's sha256 (unless ``verify_frames`` is off)."""
        out = memoryview(out).cast("B")
        metas = [self.store.blobs[i].frames[j] for i, j in frames]
        for (i, j), a, b in zip(frames[1:], metas, metas[1:]):
            if b.offset != a.offset + a.size:
                raise ValueError(f"{self._where(i, j)} does not follow the frame before it in the file")
        total = sum(f.size for f in metas)
        got = self._read_into(metas[0].offset, out[:total]) if metas else 0
        pos = 0
        for (i, j), f in zip(frames, metas):
            self._check_stored(i, j, out[pos : pos + f.size], got - pos)
            pos += f.size

    def decode_blob_into(self, index: int, out: memoryview) -> None:
        """Decode blob ``index`` into a caller-provided buffer of exactly ``nbytes`` (e.g. pinned host memory)."""
        out = memoryview(out).cast("B")
        slices = self._frame_slices(index, out)
        if self.threads == 1 or len(slices) <= 1:
            for j, piece in slices:
                self._decode_frame(index, j, piece)
        else:
            with cf.ThreadPoolExecutor(self.threads) as pool:
                for fut in [pool.submit(self._decode_frame, index, j, piece) for j, piece in slices]:
                    fut.result()
        self._check_raw(index, out)

    def iter_blobs(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(index, raw bytes)`` per blob in the given order (default: all), decoding ahead on threads.

        Frames go to the threads in tasks of up to TASK_RAW raw bytes (a small tensor's frame is grouped with the
        next ones; smaller tasks for a small model), at most ``2 * threads`` tasks in flight, so memory is bounded
        by the blobs being decoded, not by the model. Each yielded buffer is new; keeping it is the caller's choice.
        """
        order = list(range(len(self.store.blobs)) if indices is None else indices)
        window = 2 * self.threads
        # smaller tasks for a small model, so that every thread still gets some (2 per thread, down to TASK_RAW_MIN)
        limit = max(TASK_RAW_MIN, min(TASK_RAW, sum(self.store.blobs[i].nbytes for i in order) // window))
        # FIFO of (task, blobs whose last frame is in that task): tasks finish in any order but are taken in order,
        # so once a task is done every blob it lists is whole.
        pending: collections.deque[tuple[cf.Future[None] | None, list[tuple[int, memoryview]]]] = collections.deque()

        def run(task: list[tuple[int, int, memoryview]]) -> None:
            for index, j, piece in task:
                self._decode_frame(index, j, piece)

        def settle() -> Iterator[tuple[int, memoryview]]:
            fut, whole = pending.popleft()
            if fut is not None:
                fut.result()
            for index, buf in whole:
                self._check_raw(index, buf)
                yield index, buf

        with cf.ThreadPoolExecutor(self.threads) as pool:
            try:
                task: list[tuple[int, int, memoryview]] = []
                task_raw, whole = 0, []
                for index in order:
                    # np.empty, not bytearray: no zero-filling pass over memory every frame overwrites anyway.
                    # (MAP_POPULATE was tried: populating in this thread made 16-thread loads slower on the H100 VM;
                    # transparent huge pages saved ~2 ms of a 16-thread load of 363 MB on the H200, and lose
                    # malloc's reuse of freed memory on later loads.)
                    buf = memoryview(np.empty(self.store.blobs[index].nbytes, dtype=np.uint8))
                    for j, piece in self._frame_slices(index, buf):
                        if task and task_raw + len(piece) > limit:
                            pending.append((pool.submit(run, task), whole))
                            task, task_raw, whole = [], 0, []
                            while len(pending) > window:
                                yield from settle()
                        task.append((index, j, piece))
                        task_raw += len(piece)
                    whole.append((index, buf))
                if task or whole:
                    pending.append((pool.submit(run, task) if task else None, whole))
                while pending:
                    yield from settle()
            finally:
                for fut, _ in pending:
                    if fut is not None:
                        fut.cancel()

    def read_tensor(self, name: str) -> np.ndarray:
        """A new, writable array with the tensor's dtype (see numpy_dtype) and shape."""
        try:
            t = self.store.tensor(name)
        except KeyError:
            raise KeyError(
                f"{self.path}: no tensor named {name!r} in the weight store ({len(self.store.tensors)} tensors)"
            ) from None
        blob = self.store.blobs[t.blob]
        arr = np.empty(blob.nbytes, dtype=np.uint8)
        self.decode_blob_into(t.blob, memoryview(arr))
        return _shaped(arr, t.dtype, t.shape)

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor by name. Tensors with identical bytes share one read-only buffer (so arrays are read-only)."""
        by_blob: dict[int, list] = collections.defaultdict(list)
        for t in self.store.tensors:
            by_blob[t.blob].append(t)
        out: dict[str, np.ndarray] = {}
        for index, buf in self.iter_blobs(sorted(by_blob)):
            raw = np.frombuffer(buf, dtype=np.uint8)
            for t in by_blob[index]:
                arr = _shaped(raw, t.dtype, t.shape)
                arr.flags.writeable = False
                out[t.name] = arr
        return {t.name: out[t.name] for t in self.store.tensors}

    def unpack_raw(self, path: str | os.PathLike[str]) -> None:
        """Write the unpacked raw layout (each blob at its raw_offset, zero padding between) atomically, streaming."""
        order = sorted(range(len(self.store.blobs)), key=lambda i: self.store.blobs[i].raw_offset)
        with atomic_writer(path) as f:
            pos = 0
            for index, buf in self.iter_blobs(order):
                blob: Blob = self.store.blobs[index]
                if blob.raw_offset < pos:
                    raise IntegrityError(
                        f"{self.path}: {self._what(index)} raw_offset {blob.raw_offset} overlaps the previous blob (ends at {pos})",
                        hint=HINT_CORRUPT,
                    )
                f.write(bytes(blob.raw_offset - pos))
                f.write(buf)
                pos = blob.raw_offset + blob.nbytes
            f.write(bytes(self.store.raw_size - pos))


def _shaped(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype in ("int4", "uint4"):
        return raw  # packed bytes: there is no numpy shape for half-byte elements
    return raw.view(numpy_dtype(dtype)).reshape(shape)
