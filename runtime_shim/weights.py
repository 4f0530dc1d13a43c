"""Weight store reader: streams, verifies and decodes the frames of a bundle's weight file (format: docs/WEIGHT_STORE.md).

Shim side: stdlib + numpy + zstandard only (ml_dtypes is used for bfloat16/float8 when importable). Every frame's
stored bytes are checked against the manifest's sha256 before they are decoded, and every decoded size is checked,
so a tampered or truncated file fails with an IntegrityError naming the file, the blob, its tensors and the frame.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import zstandard

from .errors import IntegrityError
from .fsutil import atomic_writer, sha256_bytes
from .manifest import Blob, WeightStore

MAGIC = b"TRTXW\x00\x01\x00"  # "TRTXW", NUL, format version 1, reserved
HINT_CORRUPT = "the bundle's weight file is damaged or was modified; fetch the bundle again ('trtx-bundle verify' lists every bad file)"

# Bytes per element as stored; int4/uint4 pack two elements per byte (see nbytes_for).
ITEMSIZE = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2,
    "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "bool": 1, "float8e4m3fn": 1, "int4": 1, "uint4": 1,
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
PLANE_RAW, PLANE_ZSTD = 0, 1
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
    raw = _dctx().decompress(stored, max_output_size=len(out))
    if len(raw) != len(out):
        raise ValueError(f"decoded {len(raw)} bytes, expected {len(out)}")
    if encoding == "zstd" or element_size == 1:
        out[:] = raw
    else:
        # Layout 1: planes[k] holds byte k of every element, no rotation. One strided column write per plane
        # runs ~5x faster than numpy's generic transposed copy (measured, 4 MiB frames).
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(element_size, -1)
        elements = np.frombuffer(out, dtype=np.uint8).reshape(-1, element_size)
        for k in range(element_size):
            elements[:, k] = planes[k]


def _decode_planes(stored: memoryview, element_size: int, out: memoryview) -> None:
    """Layout 2: decode each plane (raw or zstd), interleave them and rotate the sign bit back, in whole-array passes."""
    es = element_size
    if es not in _UINT:
        raise ValueError(f"element size {es}: expected 2, 4 or 8")
    n, rest = divmod(len(out), es)
    if rest:
        raise ValueError(f"raw size {len(out)} is not a multiple of the element size {es}")
    head = 4 + 5 * es
    if len(stored) < head:
        raise ValueError(f"frame of {len(stored)} bytes is shorter than its plane header ({head} bytes)")
    fields = struct.unpack_from("<" + "BI" * es, stored, 4)
    planes, pos = [], head
    for k in range(es):
        mode, size = fields[2 * k], fields[2 * k + 1]
        data = stored[pos:pos + size]
        pos += size
        if len(data) != size:
            raise ValueError(f"plane {k}: {size} bytes announced, {len(data)} left in the frame")
        if mode == PLANE_RAW:
            plane = data
        elif mode == PLANE_ZSTD:
            plane = _decompress_into(data, _scratch(f"plane{k}", n))
        else:
            raise ValueError(f"plane {k}: unknown mode {mode}")
        if len(plane) != n:
            raise ValueError(f"plane {k} decodes to {len(plane)} bytes, expected {n}")
        planes.append(np.frombuffer(plane, dtype=np.uint8))
    if pos != len(stored):
        raise ValueError(f"{len(stored) - pos} bytes after the last plane")
    # Elements were rotated left by one bit before the split (the sign bit became bit 0, so the top plane holds
    # the exponent alone): OR the shifted planes together, then rotate right by one. ~3-5 GB/s on one core.
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


class WeightReader:
    """Reads the weight store of one bundle. Thread pools are per call; the reader holds one open file."""

    def __init__(self, bundle_dir: str | os.PathLike[str], store: WeightStore, *, threads: int | None = None, verify_raw: bool = False,
                 verify_frames: bool = True) -> None:
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
            raise IntegrityError(f"{self.path}: weight file missing (pinned by the manifest's weights.file)", hint=HINT_CORRUPT) from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size != store.file.size:
                raise IntegrityError(f"{self.path}: size {size} bytes, expected {store.file.size} (weights.file.size); truncated or replaced", hint=HINT_CORRUPT)
            head = self._file.read(len(MAGIC))
            if head != MAGIC:
                raise IntegrityError(f"{self.path}: does not start with the weight store magic {MAGIC!r} (got {head!r}); not a trtx weight file", hint=HINT_CORRUPT)
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

    def _decode_frame(self, index: int, j: int, out: memoryview) -> None:
        blob = self.store.blobs[index]
        frame = blob.frames[j]
        where = f"{self.path}: {self._what(index)}, frame {j} (file offset {frame.offset}, {frame.size} bytes)"
        # "none" frames are read into their final place and hashed there; others into a per-thread scratch buffer
        # (reused across frames: no allocation, no page faults per frame).
        plain = blob.encoding == "none" and frame.size == len(out)
        stored = out if plain else _scratch("stored", frame.size)
        got = self._read_into(frame.offset, stored)
        if got != frame.size:
            raise IntegrityError(f"{where}: file ends after {got} bytes of it; truncated", hint=HINT_CORRUPT)
        if self.verify_frames:
            actual = sha256_bytes(stored)
            if actual != frame.sha256:
                raise IntegrityError(f"{where}: sha256 {actual}, expected {frame.sha256}", hint=HINT_CORRUPT)
        if plain:
            return
        try:
            decode_frame_into(stored, blob.encoding, blob.element_size, out)
        except (ValueError, zstandard.ZstdError) as e:
            raise IntegrityError(f"{where}: cannot decode as {blob.encoding} ({e})", hint=HINT_CORRUPT) from None

    def _frame_slices(self, index: int, out: memoryview) -> list[tuple[int, memoryview]]:
        blob = self.store.blobs[index]
        if len(out) != blob.nbytes:
            raise ValueError(f"buffer for {self._what(index)} has {len(out)} bytes, expected {blob.nbytes}")
        slices, pos = [], 0
        for j, f in enumerate(blob.frames):
            slices.append((j, out[pos:pos + f.raw_size]))
            pos += f.raw_size
        return slices

    def _check_raw(self, index: int, out: memoryview) -> None:
        if self.verify_raw:
            blob = self.store.blobs[index]
            actual = sha256_bytes(out)
            if actual != blob.sha256:
                raise IntegrityError(f"{self.path}: {self._what(index)} decodes to sha256 {actual}, expected {blob.sha256}", hint=HINT_CORRUPT)

    # ----------------------------------------------------------------------- public
    def decode_frame(self, index: int, j: int, out: memoryview) -> None:
        """Read, verify (sha256) and decode frame ``j`` of blob ``index`` into ``out`` (exactly its raw_size bytes).

        The unit of work for pipelines that place frames themselves (runtime_shim.gpu_upload); thread-safe.
        """
        self._decode_frame(index, j, memoryview(out).cast("B"))

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

        At most ``2 * threads`` frames are in flight, so memory is bounded by the blobs being decoded, not by
        the model. Each yielded buffer is new; keeping it is the caller's choice.
        """
        order = list(range(len(self.store.blobs)) if indices is None else indices)
        window = 2 * self.threads
        # FIFO of frame futures and end-of-blob markers (future None): a blob is yielded when its marker comes out
        pending: collections.deque[tuple[int, cf.Future[None] | None, memoryview]] = collections.deque()
        in_flight = 0

        def settle() -> tuple[int, memoryview] | None:
            """Take the oldest entry: a whole blob (checked) to yield, or None once its frame is decoded."""
            nonlocal in_flight
            done, fut, item = pending.popleft()
            if fut is None:
                self._check_raw(done, item)
                return done, item
            fut.result()
            in_flight -= 1
            return None

        with cf.ThreadPoolExecutor(self.threads) as pool:
            try:
                for index in order:
                    # np.empty, not bytearray: no zero-filling pass over memory every frame overwrites anyway.
                    # (MAP_POPULATE was tried: populating in this thread made 16-thread loads slower on the H100 VM.)
                    buf = memoryview(np.empty(self.store.blobs[index].nbytes, dtype=np.uint8))
                    for j, piece in self._frame_slices(index, buf):
                        pending.append((index, pool.submit(self._decode_frame, index, j, piece), piece))
                        in_flight += 1
                        while in_flight > window:
                            if (ready := settle()) is not None:
                                yield ready
                    pending.append((index, None, buf))
                while pending:
                    if (ready := settle()) is not None:
                        yield ready
            finally:
                for _, fut, _ in pending:
                    if fut is not None:
                        fut.cancel()

    def read_tensor(self, name: str) -> np.ndarray:
        """A new, writable array with the tensor's dtype (see numpy_dtype) and shape."""
        try:
            t = self.store.tensor(name)
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r} in the weight store ({len(self.store.tensors)} tensors)") from None
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
                    raise IntegrityError(f"{self.path}: {self._what(index)} raw_offset {blob.raw_offset} overlaps the previous blob (ends at {pos})", hint=HINT_CORRUPT)
                f.write(bytes(blob.raw_offset - pos))
                f.write(buf)
                pos = blob.raw_offset + blob.nbytes
            f.write(bytes(self.store.raw_size - pos))


def _shaped(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype in ("int4", "uint4"):
        return raw  # packed bytes: there is no numpy shape for half-byte elements
    return raw.view(numpy_dtype(dtype)).reshape(shape)
