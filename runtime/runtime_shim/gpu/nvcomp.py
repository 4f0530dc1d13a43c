"""GPU-side decoding of weight-store frames: nvCOMP's batched zstd decoder plus one PTX kernel for the byte planes.

Why: decoding on the host is bound by the CPU (Huffman decoding of the exponent planes and the interleave pass run at
~1 GB/s a core), while PCIe moves ~55 GB/s. Here the host only reads (and verifies) the *stored* bytes, which are
smaller than the raw ones, copies them to device memory, and the GPU does the rest (bench/bench_upload.py).

Pieces, each usable alone:
- ``Nvcomp``: a ctypes binding of the four nvCOMP 5/6 C functions used (libnvcomp statically links its CUDA runtime,
  so nothing else is needed). nvCOMP's zstd decoder must only ever see verified bytes: its documentation says corrupt
  input is undefined behaviour, which is why the uploader hashes every frame on the host first.
- ``PlaneKernel``: the PTX kernel below, JIT-compiled by the driver (no NVRTC or toolkit on the user's machine).
- ``DeviceDecoder``: runs a plan (planner.py) on a stream.
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import MachineError
from .cuda import check, check_driver, cuda
from .planner import PTR_SCRATCH, PTR_STAGE, Cut

NVCOMP_HINT = (
    "pip install nvidia-libnvcomp-cu13 (or -cu12 to match the driver), or set TRTX_NVCOMP_LIBRARY to libnvcomp's path"
)


class _ZstdOpts(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_int), ("reserved", ctypes.c_char * 60)]  # nvcompBatchedZstdDecompressOpts_t


class _Alignments(ctypes.Structure):
    _fields_ = [("input", ctypes.c_size_t), ("output", ctypes.c_size_t), ("temp", ctypes.c_size_t)]


def find_nvcomp() -> str | None:
    """libnvcomp's path: $TRTX_NVCOMP_LIBRARY, the nvidia-libnvcomp-cu12/cu13 wheel, or the system's; None if absent."""
    env = os.environ.get("TRTX_NVCOMP_LIBRARY")
    if env:
        return env
    try:
        spec = importlib.util.find_spec("nvidia.libnvcomp")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub, pattern in (("lib64", "libnvcomp.so*"), ("lib", "libnvcomp.so*"), ("bin", "nvcomp*.dll")):
            found = sorted(Path(root, sub).glob(pattern))
            if found:
                return str(found[0])
    import ctypes.util

    return ctypes.util.find_library("nvcomp")


class Nvcomp:
    """nvCOMP's batched zstd decoder, through ctypes. Raises MachineError when the library is missing or unusable."""

    def __init__(self, path: str | None = None) -> None:
        path = path or find_nvcomp()
        if not path:
            raise MachineError("nvCOMP is not installed, so weights cannot be decoded on the GPU", hint=NVCOMP_HINT)
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise MachineError(f"cannot load nvCOMP from {path}: {e}", hint=NVCOMP_HINT) from None
        size_t, vp, pp = ctypes.c_size_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
        try:
            self._align = lib.nvcompBatchedZstdDecompressGetRequiredAlignments
            self._temp = lib.nvcompBatchedZstdDecompressGetTempSize
            self._run = lib.nvcompBatchedZstdDecompressAsync
        except AttributeError as e:
            raise MachineError(
                f"{path} lacks a function this shim needs ({e}); nvCOMP 5 or newer is required", hint=NVCOMP_HINT
            ) from None
        self._align.argtypes = [_ZstdOpts, ctypes.POINTER(_Alignments)]
        self._temp.argtypes = [size_t, size_t, _ZstdOpts, pp, size_t, vp]
        self._run.argtypes = [vp, vp, vp, vp, size_t, vp, size_t, vp, _ZstdOpts, vp, vp]
        for f in (self._align, self._temp, self._run):
            f.restype = ctypes.c_int
        self.path = path
        self.opts = _ZstdOpts()  # backend 0: nvCOMP picks (hardware decompression engine where the GPU has one)
        a = _Alignments()
        self._check(self._align(self.opts, ctypes.byref(a)), "nvcompBatchedZstdDecompressGetRequiredAlignments")
        self.input_alignment, self.output_alignment, self.temp_alignment = a.input, a.output, a.temp

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise MachineError(f"{what} failed with nvcompStatus_t {status}", hint=NVCOMP_HINT)

    def temp_bytes(self, chunks: int, max_chunk: int, total: int, stream: int) -> int:
        out = ctypes.c_size_t()
        self._check(
            self._temp(chunks, max_chunk, self.opts, ctypes.byref(out), total, stream),
            "nvcompBatchedZstdDecompressGetTempSize",
        )
        return out.value

    def decompress(
        self,
        in_ptrs: int,
        in_sizes: int,
        out_sizes: int,
        actual: int,
        count: int,
        temp: int,
        temp_bytes: int,
        out_ptrs: int,
        statuses: int,
        stream: int,
    ) -> None:
        """Enqueue the decode of ``count`` chunks; every array argument is a device address (see nvcomp/zstd.h)."""
        self._check(
            self._run(
                in_ptrs, in_sizes, out_sizes, actual, count, temp, temp_bytes, out_ptrs, self.opts, statuses, stream
            ),
            "nvcompBatchedZstdDecompressAsync",
        )


# --------------------------------------------------------------------------- the plane kernel
# One launch does a whole batch: blockIdx.y picks a job from a table of JOB_WORDS u64 each,
#   (out, p0 .. p7, n, es, rot):
# out[i] = join(p0[i] .. p{es-1}[i]) (little-endian: plane k is byte k of the element), rotated right by one bit when
# rot (layout 2 rotated each element left by one before splitting, so the top plane holds the exponent alone).
# es = 1 is a byte copy (stored-as-is frames). blockIdx.x and threads stride over i; byte loads of consecutive i
# coalesce. Hand-written so the driver can JIT it for any GPU from SM 7.5 on (no NVRTC or toolkit at the user's);
# tests/test_gpu_decode.py assembles it with ptxas for every SM TRT-RTX supports.
JOB_WORDS = 12
PTX = r"""
.version 7.0
.target sm_75
.address_size 64

.visible .entry trtx_join_planes(
    .param .u64 jobs_p
)
{
    .reg .pred %q<4>;
    .reg .b16 %h<2>;
    .reg .b32 %r<12>;
    .reg .b64 %d<24>;

    ld.param.u64 %d20, [jobs_p];
    cvta.to.global.u64 %d20, %d20;
    mov.u32 %r9, %ctaid.y;
    mul.wide.u32 %d21, %r9, 96;
    add.u64 %d20, %d20, %d21;
    ld.global.u64 %d0, [%d20];
    ld.global.u64 %d1, [%d20+8];
    ld.global.u64 %d2, [%d20+16];
    ld.global.u64 %d3, [%d20+24];
    ld.global.u64 %d4, [%d20+32];
    ld.global.u64 %d5, [%d20+40];
    ld.global.u64 %d6, [%d20+48];
    ld.global.u64 %d7, [%d20+56];
    ld.global.u64 %d8, [%d20+64];
    ld.global.u64 %d9, [%d20+72];
    ld.global.u32 %r0, [%d20+80];
    ld.global.u32 %r1, [%d20+88];
    cvta.to.global.u64 %d0, %d0;
    cvta.to.global.u64 %d1, %d1;
    cvta.to.global.u64 %d2, %d2;
    cvta.to.global.u64 %d3, %d3;
    cvta.to.global.u64 %d4, %d4;
    cvta.to.global.u64 %d5, %d5;
    cvta.to.global.u64 %d6, %d6;
    cvta.to.global.u64 %d7, %d7;
    cvta.to.global.u64 %d8, %d8;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mov.u32 %r5, %nctaid.x;
    mul.wide.u32 %d10, %r2, %r3;
    cvt.u64.u32 %d11, %r4;
    add.u64 %d10, %d10, %d11;
    mul.wide.u32 %d11, %r5, %r3;
    shl.b32 %r6, %r0, 3;
    sub.u32 %r6, %r6, 1;
    cvt.u64.u32 %d12, %r0;
$Lloop:
    setp.ge.u64 %q0, %d10, %d9;
    @%q0 bra $Ldone;
    add.u64 %d13, %d1, %d10;
    ld.global.u8 %r7, [%d13];
    cvt.u64.u32 %d14, %r7;
@JOIN@$Ljoined:
    setp.eq.u32 %q2, %r1, 0;
    @%q2 bra $Lstore;
    and.b64 %d15, %d14, 1;
    shr.u64 %d14, %d14, 1;
    shl.b64 %d15, %d15, %r6;
    or.b64 %d14, %d14, %d15;
$Lstore:
    mul.lo.u64 %d16, %d10, %d12;
    add.u64 %d16, %d0, %d16;
    setp.eq.u32 %q3, %r0, 1;
    @%q3 bra $Ls1;
    setp.eq.u32 %q3, %r0, 2;
    @%q3 bra $Ls2;
    setp.eq.u32 %q3, %r0, 4;
    @%q3 bra $Ls4;
    st.global.u64 [%d16], %d14;
    bra.uni $Lnext;
$Ls1:
    cvt.u16.u64 %h0, %d14;
    st.global.u8 [%d16], %h0;
    bra.uni $Lnext;
$Ls2:
    cvt.u16.u64 %h0, %d14;
    st.global.u16 [%d16], %h0;
    bra.uni $Lnext;
$Ls4:
    cvt.u32.u64 %r8, %d14;
    st.global.u32 [%d16], %r8;
$Lnext:
    add.u64 %d10, %d10, %d11;
    bra.uni $Lloop;
$Ldone:
    ret;
}
"""


def _join_ptx() -> str:
    """Planes 1-7 of the join, unrolled: OR plane k's byte in at bit 8k; stop after es planes (es is 1, 2, 4 or 8)."""
    lines = []
    for k in range(1, 8):
        if k in (1, 2, 4):  # the element ends before plane k when es <= k
            lines += [f"    setp.lt.u32 %q1, %r0, {2 * k};", "    @%q1 bra $Ljoined;"]
        lines += [
            f"    add.u64 %d13, %d{k + 1}, %d10;",
            "    ld.global.u8 %r7, [%d13];",
            "    cvt.u64.u32 %d15, %r7;",
            f"    shl.b64 %d15, %d15, {8 * k};",
            "    or.b64 %d14, %d14, %d15;",
        ]
    return "\n".join(lines) + "\n"


PTX = PTX.replace("@JOIN@", _join_ptx())
KERNEL_NAME = b"trtx_join_planes"


class PlaneKernel:
    """The join-planes kernel, loaded into the current CUDA context (make one after the runtime has set the device)."""

    BLOCK = 256
    MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y: more jobs than this go in several launches

    def __init__(self) -> None:
        self.drv = drv = cuda("driver")
        self.module = check_driver(
            drv, drv.cuModuleLoadData(PTX.encode() + b"\0"), "cuModuleLoadData (JIT of the plane kernel)"
        )
        self.function = check_driver(drv, drv.cuModuleGetFunction(self.module, KERNEL_NAME), "cuModuleGetFunction")

    def launch(self, jobs: int, count: int, max_n: int, stream: int) -> None:
        """Enqueue ``count`` jobs from the device table at ``jobs`` (JOB_WORDS u64 each); ``max_n``: the largest n."""
        drv = self.drv
        # blocks per job: enough that the largest job gives each thread a handful of elements; small jobs' spare
        # blocks exit at once
        blocks = max(1, min(256, -(-max_n // (4 * self.BLOCK))))
        for first in range(0, count, self.MAX_GRID_Y):
            rows = min(self.MAX_GRID_Y, count - first)
            args = ((jobs + 8 * JOB_WORDS * first,), (ctypes.c_uint64,))
            check_driver(
                drv,
                drv.cuLaunchKernel(self.function, blocks, rows, 1, self.BLOCK, 1, 1, 0, drv.CUstream(stream), args, 0),
                "cuLaunchKernel",
            )

    def close(self) -> None:
        if self.module is not None:
            self.drv.cuModuleUnload(self.module)
            self.module = None


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

    def __init__(self, rt: Any, copy_stream: Any) -> None:
        self.rt, self._check = rt, check
        self.copy_stream = copy_stream
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
        self.spent: collections.Counter[str] = collections.Counter()  # host seconds in nvCOMP and launch calls
        self._allocs: list[int] = []
        self._events: list[Any] = []
        self.halves: list[dict[str, Any]] = []
        self.stream = None
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
        ptr = self._check(self.rt, self.rt.cudaMalloc(n), f"cudaMalloc({n})")
        self._allocs.append(ptr)
        return ptr

    def _event(self) -> Any:
        ev = self._check(
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
        import numpy as np

        rt = self.rt
        self._size_halves(batch_bytes)
        chunks, jobs = max(max_chunks, 64), max(max_jobs, 64)
        if chunks > self._cap or jobs > self._jobcap:
            self._free_tables()
            self._cap, self._jobcap = chunks, jobs
            nbytes = 6 * 8 * chunks + 8 * JOB_WORDS * jobs
            self._tables = self._malloc(nbytes)
            self._mirror_addr = self._check(rt, rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")
            whole = np.frombuffer((ctypes.c_uint64 * (nbytes // 8)).from_address(self._mirror_addr), dtype=np.uint64)
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
        import numpy as np

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
        self._check(
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
        rt, c = self.rt, self._check
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
            t0 = time.perf_counter()
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
            self.spent["enqueue: of which the nvCOMP call"] += time.perf_counter() - t0
        j0, j1 = self._batch_job, self._njobs
        if j1 > j0:
            jobs, at = a + 6 * row + 8 * JOB_WORDS * j0, self._mirror_addr + 6 * row + 8 * JOB_WORDS * j0
            c(rt, rt.cudaMemcpyAsync(jobs, at, 8 * JOB_WORDS * (j1 - j0), h2d, self.stream), "cudaMemcpyAsync")
            t0 = time.perf_counter()
            self.kernel.launch(jobs, j1 - j0, self._max_n, int(self.stream))
            self.spent["enqueue: of which the kernel launch"] += time.perf_counter() - t0
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
        import numpy as np

        self.flush()
        rt, c = self.rt, self._check
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


def available() -> str | None:
    """Why GPU decoding is unavailable here (None when nvCOMP and cuda-python can be loaded); cheap, no GPU work."""
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed"
    if not find_nvcomp():
        return "nvCOMP is not installed"
    if sys.platform not in ("linux", "win32"):
        return f"nvCOMP does not support {sys.platform}"
    return None
