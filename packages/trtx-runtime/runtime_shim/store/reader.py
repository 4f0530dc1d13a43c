"""Weight store reader: streams, verifies and decodes the frames of a bundle's weight file on threads.

Shim side: stdlib + numpy + zstandard only (ml_dtypes is used for bfloat16/float8 when importable). Every frame's
stored bytes are checked against the digest the manifest pins (store/digest.py) before they are decoded (decode.py, by the rules of
format.py), and every decoded size is checked, so a tampered or truncated file fails with an IntegrityError naming
the file, the blob, its tensors and the frame.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import mmap
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from ..errors import IntegrityError
from ..fsutil import atomic_writer, open_regular_file, sha256_bytes
from ..manifest import Blob, WeightStore
from .decode import decode_frame_into, decode_threads, native_join, scratch
from .digest import digest_function
from .format import HINT_CORRUPT, ITEMSIZE, MAGIC, PACKED_DTYPES, PLANE_CHUNK, nbytes_for

# The reading API; format names that callers long imported from here stay importable (format.py is their home).
__all__ = [
    "HINT_CORRUPT",
    "ITEMSIZE",
    "MAGIC",
    "PLANE_CHUNK",
    "WeightReader",
    "decode_frame_into",
    "native_join",
    "nbytes_for",
    "numpy_dtype",
    "shaped",
]

# Raw bytes of frames per task on the reader's threads (iter_blobs): per-task costs on the calling thread (submit,
# settle, with 16 busy threads contending for the GIL) were paid per frame, and most frames of a model's small tensors
# are small. A small model gets smaller tasks, down to TASK_RAW_MIN, so that every thread still has some.
TASK_RAW = 4 << 20
TASK_RAW_MIN = 256 << 10
ZEROS_PER_WRITE = 4 << 20  # zeros written per call where unpack_raw leaves a gap


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
    if dtype in PACKED_DTYPES:
        return np.dtype(np.uint8)
    return np.dtype(dtype).newbyteorder("<")


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

        ``verify_frames=False`` skips the per-frame digest (sizes and decoding are still checked): for benchmarks and
        tests that measure the rest. The shim never turns it off: a file's identity (size, times, inode) cannot tell
        that its bytes are unchanged (a write through a shared mapping moves none of them), and a frame is hashed in
        this process's own memory, the very bytes then decoded (docs/WEIGHT_STORE.md, "Verification").
        """
        self.store = store
        self.verify_frames = verify_frames
        self._digest = digest_function(store.frame_digest)
        self.path = Path(bundle_dir) / store.file.path
        self.threads = max(1, threads if threads is not None else min(8, os.cpu_count() or 1))
        self.verify_raw = verify_raw
        self._lock = threading.Lock()  # for seek+read where os.pread is missing (Windows)
        self._names: dict[int, list[str]] = collections.defaultdict(list)
        for t in store.tensors:
            self._names[t.blob].append(t.name)
        try:  # a regular file only: a FIFO would hang the first read, a device or directory fail later
            self._file, size = open_regular_file(
                self.path, "the weight file pinned by weights.file", error=IntegrityError
            )
        except FileNotFoundError:
            raise IntegrityError(
                f"{self.path}: weight file missing (pinned by the manifest's weights.file)", hint=HINT_CORRUPT
            ) from None
        except IntegrityError as e:
            raise IntegrityError(str(e), hint=e.hint or HINT_CORRUPT) from None
        try:
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

    @functools.cached_property
    def identity(self) -> tuple[str, int, str, str]:
        """This weight file as pinned: (resolved path, pinned size, pinned sha256, frame digest); decoded blobs are
        shared between readers of one identity only (runtime_shim/shared_weights.py)."""
        return (str(self.path.resolve()), self.store.file.size, self.store.file.sha256, self.store.frame_digest)

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

    def where(self, index: int, j: int) -> str:
        """Names frame j of blob index for messages: the file, the blob and its tensors, the frame and its offset."""
        frame = self.store.blobs[index].frames[j]
        return f"{self.path}: {self._what(index)}, frame {j} (file offset {frame.offset}, {frame.size} bytes)"

    def _read_stored(self, index: int, j: int, stored: memoryview) -> None:
        self._check_stored(index, j, stored, self._read_into(self.store.blobs[index].frames[j].offset, stored))

    def _check_stored(self, index: int, j: int, stored: memoryview, got: int) -> None:
        """``stored`` holds frame j of blob index as read, of which ``got`` bytes came from the file: all of it, and
        (unless verify_frames is off) its pinned digest."""
        frame = self.store.blobs[index].frames[j]
        if got < frame.size:
            raise IntegrityError(
                f"{self.where(index, j)}: file ends after {max(0, got)} bytes of it; truncated", hint=HINT_CORRUPT
            )
        if self.verify_frames:
            actual = self._digest(stored)
            if actual != frame.digest:
                raise IntegrityError(
                    f"{self.where(index, j)}: {self.store.frame_digest} {actual}, expected {frame.digest}",
                    hint=HINT_CORRUPT,
                )

    def decode_frame(self, index: int, j: int, out: memoryview) -> None:
        """Read, verify (its digest) and decode frame ``j`` of blob ``index`` into ``out`` (exactly its raw_size bytes).

        The unit of work of this reader's threads, and of pipelines that place frames themselves
        (runtime_shim.gpu.upload); thread-safe.
        """
        out = memoryview(out).cast("B")
        blob = self.store.blobs[index]
        frame = blob.frames[j]
        # "none" frames are read into their final place and hashed there; others into a per-thread scratch buffer
        # (reused across frames: no allocation, no page faults per frame).
        plain = blob.encoding == "none" and frame.size == len(out)
        stored = out if plain else scratch("stored", frame.size)
        self._read_stored(index, j, stored)
        if plain:
            return
        try:
            decode_frame_into(stored, blob.encoding, blob.element_size, out)
        except (ValueError, zstandard.ZstdError) as e:
            raise IntegrityError(
                f"{self.where(index, j)}: cannot decode as {blob.encoding} ({e})", hint=HINT_CORRUPT
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
    def mapped(self) -> np.ndarray:
        """The whole weight file as a read-only uint8 array over a memory map (pages are read as touched; the map
        goes when the array does): for reading many small scattered pieces at once (frame headers, for
        the GPU planner). Nothing is verified. The size is checked first: a mapped file cut short kills the
        process on access (SIGBUS), where a read would just come back short."""
        size = os.fstat(self._file.fileno()).st_size
        if size != self.store.file.size:
            raise IntegrityError(
                f"{self.path}: size {size} bytes, expected {self.store.file.size} (weights.file.size); it changed while open",
                hint=HINT_CORRUPT,
            )
        return np.frombuffer(mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ), dtype=np.uint8)

    def read_frames(self, frames: Sequence[tuple[int, int]], out: memoryview) -> None:
        """Read frames that lie back to back in the file (``(blob, frame)`` pairs, in file order) as stored into
        ``out`` with one read, and verify each one's digest (unless ``verify_frames`` is off)."""
        out = memoryview(out).cast("B")
        metas = [self.store.blobs[i].frames[j] for i, j in frames]
        for (i, j), a, b in zip(frames[1:], metas, metas[1:]):
            if b.offset != a.offset + a.size:
                raise ValueError(f"{self.where(i, j)} does not follow the frame before it in the file")
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
        workers = decode_threads(self.threads)
        if workers == 1 or len(slices) <= 1:
            for j, piece in slices:
                self.decode_frame(index, j, piece)
        else:
            with cf.ThreadPoolExecutor(workers) as pool:
                for fut in [pool.submit(self.decode_frame, index, j, piece) for j, piece in slices]:
                    fut.result()
        self._check_raw(index, out)

    def iter_blobs(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(index, raw bytes)`` per blob in the given order (default: all), decoding ahead on threads.

        Frames go to the threads in tasks of up to TASK_RAW raw bytes (a small tensor's frame is grouped with the
        next ones; smaller tasks for a small model), at most ``2 * threads`` tasks in flight, so memory is bounded
        by the blobs being decoded, not by the model. Each yielded buffer is new; keeping it is the caller's choice.
        """
        order = list(range(len(self.store.blobs)) if indices is None else indices)
        workers = decode_threads(self.threads)
        window = 2 * workers
        # smaller tasks for a small model, so that every thread still gets some (2 per thread, down to TASK_RAW_MIN)
        limit = max(TASK_RAW_MIN, min(TASK_RAW, sum(self.store.blobs[i].nbytes for i in order) // window))
        # FIFO of (task, blobs whose last frame is in that task): tasks finish in any order but are taken in order,
        # so once a task is done every blob it lists is whole.
        pending: collections.deque[tuple[cf.Future[None] | None, list[tuple[int, memoryview]]]] = collections.deque()

        def run(task: list[tuple[int, int, memoryview]]) -> None:
            for index, j, piece in task:
                self.decode_frame(index, j, piece)

        def settle() -> Iterator[tuple[int, memoryview]]:
            fut, whole = pending.popleft()
            if fut is not None:
                fut.result()
            for index, buf in whole:
                self._check_raw(index, buf)
                yield index, buf

        with cf.ThreadPoolExecutor(workers) as pool:
            try:
                task: list[tuple[int, int, memoryview]] = []
                task_raw, whole = 0, list[tuple[int, memoryview]]()
                for index in order:
                    # np.empty, not bytearray: no zero-filling pass over memory every frame overwrites anyway.
                    # (MAP_POPULATE was tried: populating in this thread made 16-thread loads slower on the H100 VM;
                    # transparent huge pages saved ~2 ms of a 16-thread load of 363 MB on the H200, and lose
                    # malloc's reuse of freed memory on later loads.)
                    buf = np.empty(self.store.blobs[index].nbytes, dtype=np.uint8).data
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
        self.decode_blob_into(t.blob, arr.data)
        return shaped(arr, t.dtype, t.shape)

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor by name. Tensors with identical bytes share one read-only buffer (so arrays are read-only)."""
        by_blob: dict[int, list] = collections.defaultdict(list)
        for t in self.store.tensors:
            by_blob[t.blob].append(t)
        out: dict[str, np.ndarray] = {}
        for index, buf in self.iter_blobs(sorted(by_blob)):
            raw = np.frombuffer(buf, dtype=np.uint8)
            for t in by_blob[index]:
                arr = shaped(raw, t.dtype, t.shape)
                arr.flags.writeable = False
                out[t.name] = arr
        return {t.name: out[t.name] for t in self.store.tensors}

    def unpack_raw(self, path: str | os.PathLike[str], blobs: Iterable[int] | None = None) -> None:
        """Write the unpacked raw layout (each blob at its raw_offset, zero padding between) atomically, streaming.

        ``blobs``: only these (one model's of a bundle's shared store), zeros where the others would be.
        """
        wanted = range(len(self.store.blobs)) if blobs is None else set(blobs)
        order = sorted(wanted, key=lambda i: self.store.blobs[i].raw_offset)
        with atomic_writer(path) as f:
            pos = 0
            for index, buf in self.iter_blobs(order):
                blob: Blob = self.store.blobs[index]
                if blob.raw_offset < pos:
                    raise IntegrityError(
                        f"{self.path}: {self._what(index)} raw_offset {blob.raw_offset} overlaps the previous blob (ends at {pos})",
                        hint=HINT_CORRUPT,
                    )
                _write_zeros(f, blob.raw_offset - pos)
                f.write(buf)
                pos = blob.raw_offset + blob.nbytes
            _write_zeros(f, self.store.raw_size - pos)


def _write_zeros(f: Any, count: int) -> None:
    # In pieces: the gap where other models' blobs sit may be gigabytes.
    while count > 0:
        f.write(bytes(min(count, ZEROS_PER_WRITE)))
        count -= ZEROS_PER_WRITE


def shaped(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A blob's raw bytes (uint8) as a tensor of ``dtype`` and ``shape`` (a view; packed 4-bit types stay bytes)."""
    if dtype in PACKED_DTYPES:
        return raw  # packed bytes: there is no numpy shape for half-byte elements
    return raw.view(numpy_dtype(dtype)).reshape(shape)
