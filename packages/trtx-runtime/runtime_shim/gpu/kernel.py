"""The byte-plane join kernel: hand-written PTX, JIT-compiled by the driver, one launch per GPU decode batch.

Hand-written so the driver can JIT it for any GPU from SM 7.5 on (no NVRTC or toolkit on the user's machine);
tests/test_gpu_decode.py assembles it with ptxas for every SM TRT-RTX supports.
"""

from __future__ import annotations

import ctypes

from .cuda import check_driver, cuda

# One launch does a whole batch: blockIdx.y picks a job from a table of JOB_WORDS u64 each,
#   (out, p0 .. p7, n, es, rot):
# out[i] = join(p0[i] .. p{es-1}[i]) (little-endian: plane k is byte k of the element), rotated right by one bit when
# rot (layout 2 rotated each element left by one before splitting, so the top plane holds the exponent alone).
# es = 1 is a byte copy (stored-as-is frames). blockIdx.x and threads stride over i; byte loads of consecutive i
# coalesce.
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
