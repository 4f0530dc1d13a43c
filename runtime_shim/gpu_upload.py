"""Host-to-GPU weight upload: decode frames into a small ring of pinned buffers on threads while earlier ones copy.

Device memory gets one allocation holding every blob (each 256-byte aligned), so TRT-RTX refit can take device
pointers (``TensorLocation.DEVICE``). Pinned host memory is bounded by the ring (``slots * slot_bytes``), never by
the model: consecutive frames are packed into *segments* of at most one slot that map to one contiguous device
range, so each segment is one ``cudaMemcpyAsync`` on a non-default stream, and an event per slot says when the slot
may be refilled. cuda-python is imported lazily; every CUDA error raises MachineError naming the call.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import ctypes
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import MachineError
from .weights import WeightReader

DEVICE_ALIGNMENT = 256  # cudaMalloc's own alignment: what TensorRT expects of weight pointers
SLOT_BYTES = 4 << 20  # the writer's default frame size (bundler DEFAULT_CHUNK): one frame a slot at least


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as e:
            raise MachineError(f"cuda-python is not importable ({e})", hint="pip install 'cuda-python>=12.6'") from None
    return runtime


def _check(rt: Any, result: Any, what: str) -> Any:
    """cuda-python returns (err, value...): raise on err, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise MachineError(f"{what} failed: {name.decode(errors='replace')} ({text.decode(errors='replace')})",
                           hint="check that an NVIDIA GPU and driver are present (nvidia-smi) and that GPU memory is free")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class DeviceTensor:
    """Where one weight tensor lives on the GPU (its blob's bytes, shared by identical tensors)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    ptr: int
    nbytes: int


@dataclass
class DeviceWeights:
    """Every uploaded tensor, in one device allocation; free() (or the with-block) releases it."""

    tensors: dict[str, DeviceTensor]
    base: int
    nbytes: int
    device: int
    _rt: Any = field(repr=False, default=None)

    def free(self) -> None:
        if self.base:
            _check(self._rt, self._rt.cudaSetDevice(self.device), "cudaSetDevice")
            _check(self._rt, self._rt.cudaFree(self.base), "cudaFree")
            self.base = 0

    def __enter__(self) -> DeviceWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


@dataclass(frozen=True)
class _Segment:
    dev_offset: int  # start of the device range (the first frame's)
    size: int  # bytes copied, alignment gaps included
    frames: tuple[tuple[int, int, int], ...]  # (blob, frame, offset in the segment)


def _layout(reader: WeightReader, indices: list[int]) -> tuple[dict[int, int], int]:
    offsets, pos = {}, 0
    for i in indices:
        pos = -(-pos // DEVICE_ALIGNMENT) * DEVICE_ALIGNMENT
        offsets[i] = pos
        pos += reader.store.blobs[i].nbytes
    return offsets, max(pos, 1)


def _segments(reader: WeightReader, indices: list[int], offsets: dict[int, int], slot_bytes: int) -> list[_Segment]:
    out: list[_Segment] = []
    start, end, frames = -1, -1, []
    for i in indices:
        pos = offsets[i]
        for j, f in enumerate(reader.store.blobs[i].frames):
            if frames and pos + f.raw_size - start > slot_bytes:
                out.append(_Segment(start, end - start, tuple(frames)))
                frames = []
            if not frames:
                start = pos
            frames.append((i, j, pos - start))
            pos += f.raw_size
            end = pos
    if frames:
        out.append(_Segment(start, end - start, tuple(frames)))
    return out


class Uploader:
    """A CUDA stream, a ring of pinned slots and their events, reusable across uploads; close() frees them."""

    def __init__(self, *, device: int = 0, slots: int | None = None, slot_bytes: int = SLOT_BYTES, threads: int | None = None) -> None:
        self.rt = rt = _cudart()
        self.device = device
        self.threads = max(1, threads if threads is not None else min(8, os.cpu_count() or 1))
        # threads slots decoding, plus two for copies in flight: enough to keep both sides busy (bench_upload.py)
        self.slots = max(2, slots if slots is not None else self.threads + 2)
        self.slot_bytes = slot_bytes
        self.pinned_bytes = 0
        self._host = 0
        self._events: list[Any] = []
        self._stream = None
        try:
            _check(rt, rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        except MachineError as e:  # the common "no GPU / no driver" case: say what could not be done first
            raise MachineError(f"cannot upload weights to CUDA device {device}: {e}", hint=e.hint) from None
        try:
            self._stream = _check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
            self._host = _check(rt, rt.cudaMallocHost(self.slots * slot_bytes), f"cudaMallocHost({self.slots * slot_bytes})")
            self.pinned_bytes = self.slots * slot_bytes
            for _ in range(self.slots):
                self._events.append(_check(rt, rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags"))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        rt = self.rt
        for ev in self._events:
            rt.cudaEventDestroy(ev)
        self._events = []
        if self._host:
            rt.cudaFreeHost(self._host)
            self._host = 0
        if self._stream is not None:
            rt.cudaStreamDestroy(self._stream)
            self._stream = None

    def __enter__(self) -> Uploader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _slot(self, k: int) -> memoryview:
        addr = self._host + k * self.slot_bytes
        return memoryview((ctypes.c_ubyte * self.slot_bytes).from_address(addr)).cast("B")

    def upload(self, reader: WeightReader, indices: Iterable[int] | None = None) -> DeviceWeights:
        """Decode (verifying every frame) and copy the given blobs (default: all) into one new device allocation."""
        rt = self.rt
        order = list(range(len(reader.store.blobs)) if indices is None else indices)
        too_big = max((f.raw_size for i in order for f in reader.store.blobs[i].frames), default=0)
        if too_big > self.slot_bytes:
            raise ValueError(f"a frame of {too_big} bytes does not fit a {self.slot_bytes}-byte pinned slot; pass slot_bytes >= {too_big}")
        offsets, total = _layout(reader, order)
        _check(rt, rt.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        base = _check(rt, rt.cudaMalloc(total), f"cudaMalloc({total})")
        try:
            self._run(reader, _segments(reader, order, offsets, self.slot_bytes), base)
        except BaseException:
            rt.cudaStreamSynchronize(self._stream)
            rt.cudaFree(base)
            raise
        tensors = {}
        for t in reader.store.tensors:
            if t.blob in offsets:
                tensors[t.name] = DeviceTensor(t.name, t.dtype, tuple(t.shape), base + offsets[t.blob], reader.store.blobs[t.blob].nbytes)
        return DeviceWeights(tensors=tensors, base=base, nbytes=total, device=self.device, _rt=rt)

    def _run(self, reader: WeightReader, segments: list[_Segment], base: int) -> None:
        rt, h2d = self.rt, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        used = [False] * self.slots

        def decode(seg: _Segment, slot: int) -> None:
            buf = self._slot(slot)
            for i, j, off in seg.frames:
                reader.decode_frame(i, j, buf[off:off + reader.store.blobs[i].frames[j].raw_size])

        def issue(k: int, fut: cf.Future[None]) -> None:
            fut.result()  # decoded and verified
            seg, slot = segments[k], k % self.slots
            _check(rt, rt.cudaMemcpyAsync(base + seg.dev_offset, self._host + slot * self.slot_bytes, seg.size, h2d, self._stream), "cudaMemcpyAsync")
            _check(rt, rt.cudaEventRecord(self._events[slot], self._stream), "cudaEventRecord")
            used[slot] = True

        pending: collections.deque[tuple[int, cf.Future[None]]] = collections.deque()
        with cf.ThreadPoolExecutor(self.threads) as pool:
            try:
                for k, seg in enumerate(segments):
                    while len(pending) >= self.slots - 1:  # keep one slot for the copy in flight
                        issue(*pending.popleft())
                    slot = k % self.slots
                    if used[slot]:  # its previous segment's copy must be done before it is overwritten
                        _check(rt, rt.cudaEventSynchronize(self._events[slot]), "cudaEventSynchronize")
                    pending.append((k, pool.submit(decode, seg, slot)))
                while pending:
                    issue(*pending.popleft())
            finally:
                for _, fut in pending:
                    fut.cancel()
        _check(rt, rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")


def upload_weights(reader: WeightReader, *, device: int = 0, threads: int | None = None, slots: int | None = None) -> DeviceWeights:
    """One-shot: stream the whole weight store to the GPU; returns device pointers per tensor (see DeviceWeights)."""
    slot_bytes = max((f.raw_size for b in reader.store.blobs for f in b.frames), default=1)
    with Uploader(device=device, slots=slots, slot_bytes=max(slot_bytes, 1 << 20), threads=threads or reader.threads) as up:
        return up.upload(reader)
