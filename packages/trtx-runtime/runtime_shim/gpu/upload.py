"""Host-to-GPU weight upload: a small ring of pinned buffers filled on threads while earlier ones copy.

Two ways to fill a slot, same ring:
- decode on the GPU (when nvCOMP is installed; device_decode.py): threads read and sha256-verify the *stored*
  frames into the slot, the slot goes to device staging memory, and nvCOMP plus one kernel decode there. The host's
  work per byte is a read and a hash, of fewer bytes than the raw model.
- decode on the host: threads read, verify and decode each frame into the slot, and the slot goes to its final place.

Device memory gets one allocation holding every blob (each 256-byte aligned), so TRT-RTX refit can take device
pointers (``TensorLocation.DEVICE``). Pinned host memory is bounded by the ring (``slots * slot_bytes``), never by
the model; an event per slot says when the slot may be refilled. Where the bytes go is packing.py's arithmetic.
cuda-python is imported lazily; every CUDA error raises MachineError naming the call.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import ctypes
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import IntegrityError, MachineError
from ..store.decode import decode_threads
from ..store.format import HINT_CORRUPT
from ..store.reader import WeightReader
from .cuda import check, cudart
from .packing import (
    DEVICE_SEGMENT,
    HostSegment,
    StoredSegment,
    device_layout,
    frame_table,
    host_segments,
    pack_stored,
)
from .stats import Stats, timed

if TYPE_CHECKING:  # imported when the GPU decodes (nvCOMP installed), not with the uploader
    from .device_decode import DeviceDecoder

SLOT_BYTES = 4 << 20  # the writer's default frame size (bundler DEFAULT_CHUNK): one frame a slot at least


class DeviceTensor(NamedTuple):
    """Where one weight tensor lives on the GPU (its blob's bytes, shared by identical tensors).

    A NamedTuple, not a frozen dataclass: an upload makes one per tensor, and thousands of frozen-dataclass
    inits cost milliseconds of the load (bench_upload.py)."""

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
            check(self._rt, self._rt.cudaSetDevice(self.device), "cudaSetDevice")
            check(self._rt, self._rt.cudaFree(self.base), "cudaFree")
            self.base = 0

    def __enter__(self) -> DeviceWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()


class Uploader:
    """A CUDA stream, a ring of pinned slots and their events, reusable across uploads; close() frees them."""

    def __init__(
        self,
        *,
        device: int = 0,
        slots: int | None = None,
        slot_bytes: int = SLOT_BYTES,
        threads: int | None = None,
        decode: str = "auto",
        batch_bytes: int | None = None,
        stats: Stats | None = None,
    ) -> None:
        """``decode``: ``auto`` (on the GPU when nvCOMP is installed, else on the host), ``device`` or ``host``.
        ``batch_bytes``: stored bytes per GPU decode batch (default: DeviceDecoder.batch_for); the GPU decoder takes
        6x that in device memory. ``stats``: seconds by step of every upload on the calling thread, for benchmarks
        (bench_upload.py prints them); None, the default, times nothing."""
        if decode not in ("auto", "device", "host"):
            raise ValueError(f"decode={decode!r}: expected 'auto', 'device' or 'host'")
        self.decode, self.batch_bytes = decode, batch_bytes
        self.decode_why: str | None = None
        self.stats = stats
        self.decoded_on: str | None = None
        self.device_decoder: DeviceDecoder | None = None  # made by the first upload it decodes, kept for reuse
        self.rt = rt = cudart()
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
            check(rt, rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        except MachineError as e:  # the common "no GPU / no driver" case: say what could not be done first
            raise MachineError(f"cannot upload weights to CUDA device {device}: {e}", hint=e.hint) from None
        try:
            self._stream = check(
                rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
            )
            self._host = check(
                rt, rt.cudaMallocHost(self.slots * slot_bytes), f"cudaMallocHost({self.slots * slot_bytes})"
            )
            self.pinned_bytes = self.slots * slot_bytes
            for _ in range(self.slots):
                self._events.append(
                    check(rt, rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        rt = self.rt
        if self.device_decoder is not None:
            self.device_decoder.close()
            self.device_decoder = None
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

    def _decoder(self, reader: WeightReader) -> DeviceDecoder | None:
        """The GPU decoder to use for this store, or None to decode on the host (``self.decode_why`` says why)."""
        if self.decode == "host" or all(b.encoding == "none" for b in reader.store.blobs):
            self.decode_why = "decode='host'" if self.decode == "host" else "the store is uncompressed"
            return None
        decoder = self.device_decoder
        if decoder is None:
            from . import nvcomp

            why = nvcomp.available()
            if why is None:
                from .device_decode import DeviceDecoder

                try:
                    decoder = self.device_decoder = DeviceDecoder(self.rt, self._stream, self.stats)
                except MachineError as e:
                    why = str(e)
            if decoder is None:
                if self.decode == "device":
                    raise MachineError(f"cannot decode weights on the GPU: {why}", hint=nvcomp.NVCOMP_HINT)
                self.decode_why = why
                return None
        self.decode_why = None
        decoder.stats = self.stats  # whatever this uploader's stats are now
        return decoder

    def upload(self, reader: WeightReader, indices: Iterable[int] | None = None) -> DeviceWeights:
        """Verify, decode and copy the given blobs (default: all) into one new device allocation.

        Frames are decoded on the GPU when nvCOMP is available (``decode``), else on host threads into the pinned ring.
        """
        rt, stats = self.rt, self.stats
        with timed(stats, "layout, decoder check"):
            order = list(range(len(reader.store.blobs)) if indices is None else indices)
            too_big = max((max(f.raw_size, f.size) for i in order for f in reader.store.blobs[i].frames), default=0)
            if too_big > self.slot_bytes:
                raise ValueError(
                    f"a frame of {too_big} bytes does not fit a {self.slot_bytes}-byte pinned slot; pass slot_bytes >= {too_big}"
                )
            offsets, total = device_layout(reader, order)
            check(rt, rt.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
            decoder = self._decoder(reader)
            self.decoded_on = "host" if decoder is None else "gpu"
        with timed(stats, "cudaMalloc"):
            base = check(rt, rt.cudaMalloc(total), f"cudaMalloc({total})")
        tensors: dict[str, DeviceTensor] = {}

        def tensor_table() -> None:
            # run while the GPU finishes the last batch: ~1 us a tensor, 1-2 ms for a model of 1664 tensors
            with timed(stats, "tensor table"):
                for t in reader.store.tensors:
                    if t.blob in offsets:
                        tensors[t.name] = DeviceTensor(
                            t.name, t.dtype, tuple(t.shape), base + offsets[t.blob], reader.store.blobs[t.blob].nbytes
                        )

        try:
            if decoder is None:
                self._run_host(reader, host_segments(reader, order, offsets, self.slot_bytes), base, tensor_table)
            else:
                self._run_device(reader, decoder, order, offsets, base, tensor_table)
        except BaseException:
            rt.cudaStreamSynchronize(self._stream)
            if decoder is not None and decoder.stream is not None:
                rt.cudaStreamSynchronize(decoder.stream)
            rt.cudaFree(base)
            raise
        return DeviceWeights(tensors=tensors, base=base, nbytes=total, device=self.device, _rt=rt)

    def _ring(
        self,
        segments: list[Any],
        slot_bytes: int,
        nslots: int,
        submit: Callable[[cf.ThreadPoolExecutor, Any, memoryview], list[cf.Future[None]]],
        enqueue: Callable[[Any, int], None],
        first: Callable[[], None] | None = None,
        workers: int | None = None,
    ) -> None:
        """For each segment, in order: ``submit(pool, segment, slot_view)`` starts its work on threads (futures),
        ``enqueue(segment, slot)`` runs here once they are done (it enqueues the copies out of the slot), and a slot
        is refilled only once the copies out of it are done. The ring is the pinned block cut in ``nslots``.
        ``first()``, if given, runs here once the first slots' work is under way (work that can overlap it)."""
        rt, stats = self.rt, self.stats
        used = [False] * nslots

        def issue(k: int, futs: list[cf.Future[None]]) -> None:
            with timed(stats, "wait for threads"):
                for fut in futs:
                    fut.result()  # read and verified (and decoded, on the host path)
            with timed(stats, "enqueue"):
                slot = k % nslots
                enqueue(segments[k], slot)
                check(rt, rt.cudaEventRecord(self._events[slot], self._stream), "cudaEventRecord")
                used[slot] = True

        pending: collections.deque[tuple[int, list[cf.Future[None]]]] = collections.deque()
        with cf.ThreadPoolExecutor(workers or self.threads) as pool:
            try:
                for k, seg in enumerate(segments):
                    if len(pending) >= nslots - 1 and first is not None:
                        start, first = first, None
                        start()
                    while len(pending) >= nslots - 1:  # keep one slot for the copy in flight
                        issue(*pending.popleft())
                    slot = k % nslots
                    if used[slot]:  # its previous segment's copy must be done before it is overwritten
                        with timed(stats, "wait for a free slot"):
                            check(rt, rt.cudaEventSynchronize(self._events[slot]), "cudaEventSynchronize")
                    at = self._host + slot * slot_bytes
                    view = memoryview((ctypes.c_ubyte * slot_bytes).from_address(at)).cast("B")
                    pending.append((k, submit(pool, seg, view)))
                if first is not None:
                    first()
                while pending:
                    issue(*pending.popleft())
            finally:
                for _, futs in pending:
                    for fut in futs:
                        fut.cancel()

    def _run_host(
        self, reader: WeightReader, segments: list[HostSegment], base: int, while_waiting: Callable[[], None]
    ) -> None:
        rt, h2d = self.rt, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice

        def decode(seg: HostSegment, buf: memoryview) -> None:
            for i, j, off in seg.frames:
                reader.decode_frame(i, j, buf[off : off + reader.store.blobs[i].frames[j].raw_size])

        def enqueue(seg: HostSegment, slot: int) -> None:
            src = self._host + slot * self.slot_bytes
            check(rt, rt.cudaMemcpyAsync(base + seg.dev_offset, src, seg.size, h2d, self._stream), "cudaMemcpyAsync")

        self._ring(
            segments,
            self.slot_bytes,
            self.slots,
            lambda pool, seg, view: [pool.submit(decode, seg, view)],
            enqueue,
            workers=decode_threads(self.threads),  # host decode: without the C helper more threads can be slower
        )
        while_waiting()
        check(rt, rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def _run_device(
        self,
        reader: WeightReader,
        decoder: DeviceDecoder,
        order: list[int],
        offsets: dict[int, int],
        base: int,
        while_waiting: Callable[[], None],
    ) -> None:
        import numpy as np

        from .planner import Cuts, FrameFormatError, plan_frames

        stats = self.stats
        with timed(stats, "frame table"):
            t = frame_table(reader, order, offsets)
        largest = int(t["size"].max()) if len(t["size"]) else 1
        batch = self.batch_bytes or decoder.batch_for(
            int(t["size"].sum()), check(self.rt, self.rt.cudaMemGetInfo(), "cudaMemGetInfo")[0]
        )
        widest = int(t["raw"].max()) if len(t["raw"]) else 1
        if largest > batch or widest > 2 * batch:
            raise ValueError(
                f"a frame of {largest} stored / {widest} raw bytes does not fit a GPU decode batch of {batch} bytes; "
                f"pass batch_bytes >= {max(largest, -(-widest // 2))}"
            )
        frames = list(zip(t["blob"].tolist(), t["frame"].tolist()))

        def integrity(k: int, e: Exception) -> IntegrityError:
            i, j = frames[k]
            return IntegrityError(
                f"{reader.where(i, j)}: cannot decode as {reader.store.blobs[i].encoding} ({e})", hint=HINT_CORRUPT
            )

        ring = self.slots * self.slot_bytes
        slot_bytes = max(largest, min(ring // 4, batch, DEVICE_SEGMENT))
        nslots = max(2, min(self.slots, ring // slot_bytes))  # one event per slot: self.slots of them
        segments = pack_stored(t, slot_bytes, raw_cap=2 * batch)  # a segment must decode within one batch's scratch
        delta = t["slot_off"] - t["file"]
        planned: list[Any] = []

        def plan_all() -> None:
            # Plan every frame at once from the mapped file (headers and chunk tables only are touched): one numpy
            # pass, where planning segment by segment cost ~1 ms each in the copy loop; it runs while the first
            # segments are read. What the plan was derived from is checked again in each segment as read (cut), so
            # the GPU only ever gets the plan of the bytes it receives.
            with timed(stats, "plan every frame (numpy), size the decoder"):
                try:
                    # (a file cut short while mapped would kill the process with SIGBUS: mapped() checks its size first)
                    plan = plan_frames(reader.mapped(), t["file"], t["size"], t["raw"], t["es"], t["enc"], t["dst"])
                except FrameFormatError as e:
                    raise integrity(e.frame, e) from None
                planned[:] = [Cuts(plan, [(seg.lo, seg.hi) for seg in segments], delta)]
                chunk_raw = int(plan.chunk_raw.max()) if len(plan.chunk_raw) else 1
                decoder.begin(batch, len(plan.chunk_in), len(plan.job_out), chunk_raw)

        def submit(pool: cf.ThreadPoolExecutor, seg: StoredSegment, view: memoryview) -> list[cf.Future[None]]:
            return [pool.submit(reader.read_frames, frames[a:b], view[int(t["slot_off"][a]) :]) for a, b in seg.runs]

        def enqueue(seg: StoredSegment, slot: int) -> None:
            lo, hi = seg.lo, seg.hi
            host = self._host + slot * slot_bytes
            end = int(t["slot_off"][hi - 1] + t["size"][hi - 1])
            with timed(stats, "enqueue: of which cutting the plan"):
                try:
                    stored = np.frombuffer(memoryview((ctypes.c_ubyte * end).from_address(host)), dtype=np.uint8)
                    part = planned[0].cut(lo, hi, stored)
                except FrameFormatError as e:
                    raise integrity(lo + e.frame, e) from None
            decoder.add_segment(part, host, end, base, frames[lo:hi])

        self._ring(segments, slot_bytes, nslots, submit, enqueue, first=plan_all)
        with timed(stats, "wait for the GPU at the end", less="tensor table"):  # the table has its own line
            failed = decoder.finish(while_waiting)
        check(self.rt, self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        if failed:
            (i, j), status, got, want = failed[0]
            raise IntegrityError(
                f"{reader.where(i, j)}: the GPU decoder (nvCOMP) returned status {status} and {got} of {want} bytes"
                + (f"; {len(failed) - 1} more chunks failed" if len(failed) > 1 else ""),
                hint=HINT_CORRUPT,
            )


def upload_weights(
    reader: WeightReader, *, device: int = 0, threads: int | None = None, slots: int | None = None, decode: str = "auto"
) -> DeviceWeights:
    """One-shot: stream the whole weight store to the GPU; returns device pointers per tensor (see DeviceWeights)."""
    slot_bytes = max((max(f.raw_size, f.size) for b in reader.store.blobs for f in b.frames), default=1)
    with Uploader(
        device=device,
        slots=slots,
        slot_bytes=max(slot_bytes, 1 << 20),
        threads=threads or reader.threads,
        decode=decode,
    ) as up:
        return up.upload(reader)
