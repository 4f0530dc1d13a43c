"""DeviceDecoder: decodes verified stored frames on the GPU, with nvCOMP's batched zstd and the plane kernel.

Why: decoding on the host is bound by the CPU (Huffman decoding of the exponent planes and the interleave pass run at
~1 GB/s a core), while PCIe moves ~55 GB/s. Here the host only reads (and verifies) the *stored* bytes, which are
smaller than the raw ones, copies them to device memory, and the GPU does the rest (bench/bench_upload.py). What to
decode where comes from a plan (planner.py); nvCOMP (nvcomp.py) must only ever see verified bytes.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..errors import MachineError
from .cuda import check
from .kernel import JOB_WORDS, PlaneKernel
from .nvcomp import NVCOMP_HINT, Nvcomp
from .planner import PTR_SCRATCH, PTR_STAGE, Cut
from .stats import Stats, timed


def _up(x: int, a: int) -> int:
    return -(-x // a) * a


_ALIGN = 256  # every staging and scratch range starts here: more than nvCOMP asks of any buffer (checked at start)


class DeviceDecoder:
    """Decodes stored frames that the caller has put in pinned host memory into their final device addresses.

    Two halves, each a staging area (stored bytes, ``batch_bytes``) and a scratch area (decoded zstd planes,
    ``2 * batch_bytes``), alternate: while the GPU decodes batch k from one half, the copy stream fills the other
    with batch k+1. Copies run on the caller's ``copy_stream``; nvCOMP and the kernel on a stream of this decoder;
    events order the two, so the host never waits on the GPU except through the caller's pinned ring.
    """

    def __init__(self, rt: Any, copy_stream: Any, stats: Stats | None = None) -> None:
        """``stats``: where the host's seconds in the nvCOMP and kernel-launch calls go (benchmarks); None: untimed."""
        self.rt, self.copy_stream, self.stats = rt, copy_stream, stats
        self.batch_bytes = 0  # set by begin(): the halves are (re)made for each upload's batch size
        self.nvcomp = Nvcomp()
        a = self.nvcomp
        if a.input_alignment != 1 or a.output_alignment != 1 or a.temp_alignment > _ALIGN:
            raise MachineError(
                f"nvCOMP at {a.path} asks for input alignment {a.input_alignment} and output alignment {a.output_alignment}; "
                f"this shim decodes chunks where they lie, so it needs 1 for both",
                hint=NVCOMP_HINT,
            )
        self._temp, self._temp_bytes = 0, 0
        self._tables, self._mirror_addr, self._cap, self._jobcap = 0, 0, 0, 0
        self._allocs: list[int] = []
        self._events: list[Any] = []
        self.halves: list[dict[str, Any]] = []
        self.stream: Any = None  # a cudaStream_t once made
        self.kernel: PlaneKernel | None = None
        try:
            self.stream = check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
            self.kernel = PlaneKernel()
            for _ in range(2):
                self.halves.append(
                    {"stage": 0, "scratch": 0, "copied": self._event(), "decoded": self._event(), "used": False}
                )
        except BaseException:
            self.close()
            raise

    @property
    def held(self) -> tuple[int, ...]:
        """The device allocations this decoder keeps between uploads (staging, scratch, tables, nvCOMP's temp)."""
        return tuple(self._allocs)

    @staticmethod
    def batch_for(stored: int, free_device: int) -> int:
        """The batch size for an upload of ``stored`` bytes: nvCOMP takes ~4.5 ms per call whatever the chunk count
        up to ~2500 chunks of 64 KiB (measured on an H200, bench/README.md), so batches are as big as they can be
        while still two (one decodes while the next copies): half the upload, 16-256 MiB, and the decoder's
        6 x batch of device memory at most an eighth of what is free."""
        return max(16 << 20, min(256 << 20, -(-stored // 2), free_device // 48))

    def _size_halves(self, batch_bytes: int) -> None:
        if batch_bytes <= self.batch_bytes:
            return
        for h in self.halves:
            for key in ("stage", "scratch"):
                if h[key]:
                    self._allocs.remove(h[key])
                    self.rt.cudaFree(h[key])
                    h[key] = 0
        for h in self.halves:
            h["stage"], h["scratch"] = self._malloc(batch_bytes), self._malloc(2 * batch_bytes)
        self.batch_bytes = batch_bytes

    def _malloc(self, n: int) -> int:
        ptr = check(self.rt, self.rt.cudaMalloc(n), f"cudaMalloc({n})")
        self._allocs.append(ptr)
        return ptr

    def _event(self) -> Any:
        ev = check(
            self.rt, self.rt.cudaEventCreateWithFlags(self.rt.cudaEventDisableTiming), "cudaEventCreateWithFlags"
        )
        self._events.append(ev)
        return ev

    def close(self) -> None:
        rt = self.rt
        if self.stream is not None:
            rt.cudaStreamSynchronize(self.stream)
        for ev in self._events:
            rt.cudaEventDestroy(ev)
        if self._mirror_addr:
            rt.cudaFreeHost(self._mirror_addr)
        for ptr in self._allocs:
            rt.cudaFree(ptr)
        self._events, self._allocs, self._mirror_addr, self._tables = [], [], 0, 0
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        if self.stream is not None:
            rt.cudaStreamDestroy(self.stream)
            self.stream = None

    # ------------------------------------------------------------------ one upload
    def begin(self, batch_bytes: int, max_chunks: int, max_jobs: int, max_chunk_raw: int) -> None:
        """Size the halves (``batch_bytes`` stored bytes a batch), the per-upload tables (nvCOMP's pointer, size and
        status arrays; the kernel's jobs), pinned on the host and mirrored on the device, and nvCOMP's temporary
        memory. Memory only grows: an uploader's next upload reuses it."""
        rt = self.rt
        self._size_halves(batch_bytes)
        chunks, jobs = max(max_chunks, 64), max(max_jobs, 64)
        if chunks > self._cap or jobs > self._jobcap:
            self._free_tables()
            self._cap, self._jobcap = chunks, jobs
            nbytes = 6 * 8 * chunks + 8 * JOB_WORDS * jobs
            self._tables = self._malloc(nbytes)
            self._mirror_addr = check(rt, rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")
            whole = np.frombuffer(
                memoryview((ctypes.c_uint64 * (nbytes // 8)).from_address(self._mirror_addr)), dtype=np.uint64
            )
            self._mirror = whole[: 6 * chunks].reshape(6, chunks)
            self._jobs = whole[6 * chunks :].reshape(jobs, JOB_WORDS)
        need = self.nvcomp.temp_bytes(self._cap, max(max_chunk_raw, 1), 2 * self.batch_bytes, int(self.stream))
        if need > self._temp_bytes:
            if self._temp:
                self._allocs.remove(self._temp)
                rt.cudaFree(self._temp)
            self._temp, self._temp_bytes = self._malloc(need), need
        self._nchunks = self._njobs = 0
        self._labels: list[
            tuple[int, Any, Any]
        ] = []  # (first chunk, chunk -> frame in segment, segment's frame labels)
        self._batch_chunk = self._batch_job = 0
        self._half = 0
        self._stage_pos = self._scratch_pos = self._batch_raw = self._max_n = 0

    def _free_tables(self) -> None:
        if self._mirror_addr:
            self.rt.cudaFreeHost(self._mirror_addr)
            self._mirror_addr = 0
        if self._tables:
            self._allocs.remove(self._tables)
            self.rt.cudaFree(self._tables)
            self._tables = 0

    def add_segment(self, seg: Cut, src: int, nbytes: int, base: int, labels: Any) -> None:
        """Enqueue one segment: its ``nbytes`` stored bytes are at pinned address ``src``; ``base`` is the upload's
        device allocation; ``labels[i]`` names frame i of the segment in errors.

        One copy is enqueued now, on the copy stream (the caller may reuse ``src`` once its own event passes); the
        chunks and jobs join the batch, decoded when it is flushed.
        """
        rt = self.rt
        stage_need, scratch_need, decoded = (
            _up(nbytes, _ALIGN),
            _up(seg.scratch_bytes, _ALIGN),
            int(seg.chunk_raw.sum()),
        )
        cap = 2 * self.batch_bytes
        if stage_need > self.batch_bytes or scratch_need > cap or decoded > cap:
            raise ValueError(
                f"a segment of {nbytes} stored bytes needs {scratch_need} scratch bytes; batch_bytes={self.batch_bytes} is too small"
            )
        c0, nc, j0, nj = self._nchunks, len(seg.chunk_in), self._njobs, len(seg.job_out)
        if c0 + nc > self._cap or j0 + nj > self._jobcap:
            raise ValueError(f"more chunks or jobs than the {self._cap} / {self._jobcap} announced to begin()")
        if (
            self._stage_pos + stage_need > self.batch_bytes
            or self._scratch_pos + scratch_need > cap
            or self._batch_raw + decoded > cap
        ):
            self.flush()
        half = self.halves[self._half]
        stage, scratch = half["stage"] + self._stage_pos, half["scratch"] + self._scratch_pos
        # nvCOMP reads input at any byte (input alignment 1, checked at start): the whole segment goes up in one copy
        # and every chunk and raw plane is used where it lands.
        check(
            rt,
            rt.cudaMemcpyAsync(stage, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.copy_stream),
            "cudaMemcpyAsync",
        )
        m = self._mirror
        m[0, c0 : c0 + nc] = stage + seg.chunk_in
        m[1, c0 : c0 + nc] = seg.chunk_size
        m[2, c0 : c0 + nc] = seg.chunk_raw
        m[3, c0 : c0 + nc] = np.where(seg.chunk_to_dst, base, scratch) + seg.chunk_out
        jt = self._jobs[j0 : j0 + nj]
        jt[:, 0] = base + seg.job_out
        jt[:, 1:9] = np.where(
            seg.job_kind == PTR_STAGE,
            stage + seg.job_ptr,
            np.where(seg.job_kind == PTR_SCRATCH, scratch + seg.job_ptr, 0),
        )
        jt[:, 9], jt[:, 10], jt[:, 11] = seg.job_n, seg.job_es, seg.job_rot
        self._labels.append((c0, seg.chunk_frame, labels))
        self._nchunks, self._njobs = c0 + nc, j0 + nj
        self._stage_pos += stage_need
        self._scratch_pos += scratch_need
        self._batch_raw += decoded
        self._max_n = max(self._max_n, int(seg.job_n.max()) if nj else 0)

    def flush(self) -> None:
        """Decode what was added since the last flush (on the decoder's stream, after the copies), then switch halves."""
        if not self._stage_pos:
            return
        rt, c = self.rt, check
        half = self.halves[self._half]
        c(rt, rt.cudaEventRecord(half["copied"], self.copy_stream), "cudaEventRecord")
        c(rt, rt.cudaStreamWaitEvent(self.stream, half["copied"], 0), "cudaStreamWaitEvent")
        h2d, row, a = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, 8 * self._cap, self._tables
        first, last = self._batch_chunk, self._nchunks
        if last > first:
            for r in range(4):
                c(
                    rt,
                    rt.cudaMemcpyAsync(
                        a + r * row + 8 * first,
                        self._mirror_addr + r * row + 8 * first,
                        8 * (last - first),
                        h2d,
                        self.stream,
                    ),
                    "cudaMemcpyAsync",
                )
            with timed(self.stats, "enqueue: of which the nvCOMP call"):
                self.nvcomp.decompress(
                    a + 8 * first,
                    a + row + 8 * first,
                    a + 2 * row + 8 * first,
                    a + 4 * row + 8 * first,
                    last - first,
                    self._temp,
                    self._temp_bytes,
                    a + 3 * row + 8 * first,
                    a + 5 * row + 4 * first,
                    int(self.stream),
                )
        j0, j1 = self._batch_job, self._njobs
        if j1 > j0:
            jobs, at = a + 6 * row + 8 * JOB_WORDS * j0, self._mirror_addr + 6 * row + 8 * JOB_WORDS * j0
            c(rt, rt.cudaMemcpyAsync(jobs, at, 8 * JOB_WORDS * (j1 - j0), h2d, self.stream), "cudaMemcpyAsync")
            assert self.kernel is not None  # None only once closed
            with timed(self.stats, "enqueue: of which the kernel launch"):
                self.kernel.launch(jobs, j1 - j0, self._max_n, int(self.stream))
        c(rt, rt.cudaEventRecord(half["decoded"], self.stream), "cudaEventRecord")
        half["used"] = True
        self._batch_chunk, self._batch_job = last, j1
        self._stage_pos = self._scratch_pos = self._batch_raw = self._max_n = 0
        self._half ^= 1
        nxt = self.halves[self._half]
        if nxt["used"]:  # the copy stream must not overwrite that half before its last batch is decoded
            c(rt, rt.cudaStreamWaitEvent(self.copy_stream, nxt["decoded"], 0), "cudaStreamWaitEvent")

    def finish(self, while_waiting: Any = None) -> list[tuple[Any, int, int, int]]:
        """Flush, wait for the GPU, and return the chunks nvCOMP did not decode as expected:
        ``(frame label, nvcompStatus_t, bytes decoded, bytes expected)``; empty when all is well.
        ``while_waiting()``, if given, runs once the last batch is enqueued, before the wait (host work that can
        overlap the GPU's tail)."""
        self.flush()
        rt, c = self.rt, check
        n = self._nchunks
        if n:
            row = 8 * self._cap
            c(
                rt,
                rt.cudaMemcpyAsync(
                    self._mirror_addr + 4 * row,
                    self._tables + 4 * row,
                    2 * row,
                    rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    self.stream,
                ),
                "cudaMemcpyAsync",
            )
        if while_waiting is not None:
            while_waiting()
        c(rt, rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        for h in self.halves:
            h["used"] = False
        if not n:
            return []
        actual = self._mirror[4, :n]
        status = np.frombuffer(self._mirror[5].data, dtype=np.int32)[:n]
        bad = np.nonzero((status != 0) | (actual != self._mirror[2, :n]))[0]
        out = []
        for i in bad[:10]:
            first, frames, labels = next(entry for entry in reversed(self._labels) if entry[0] <= i)
            out.append((labels[int(frames[i - first])], int(status[i]), int(actual[i]), int(self._mirror[2, i])))
        return out
