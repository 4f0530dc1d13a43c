"""Planning the GPU decode of weight-store frames (pure numpy, runs and is tested on the CPU).

Says which byte ranges of the stored frames go to the GPU and how each decodes there: nvCOMP zstd chunks, then
jobs of the byte-plane kernel (nvcomp.py). Every frame is checked against the store's format rules before any byte
reaches nvCOMP, whose documentation calls corrupt input undefined behaviour: the rules, table layouts and error
texts of runtime_shim/store/format.py, applied to every frame of an upload at once (tests/store_vectors.py checks
that this planner accepts and refuses what format.py does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..store import format as fmt
from ..store.decode import native_helper
from ..store.format import ENC_BYTEPLANE, ENC_NONE, ENC_ZSTD, PLANE_CHUNK, PLANES_TAG, ZSTD_MAX_BLOCKS
from .zstd_heads import FrameFormatError, check_zstd_heads, le_rows

# --------------------------------------------------------------------------- planning (pure)
ENCODINGS = fmt.ENCODING_CODES  # encoding name -> the ENC_* code of the frame arrays
PTR_NONE, PTR_STAGE, PTR_SCRATCH = 0, 1, 2  # what a job's plane pointer is an offset into
_TAG = int.from_bytes(PLANES_TAG, "little")
__all__ = ["ENCODINGS", "ENC_BYTEPLANE", "ENC_NONE", "ENC_ZSTD", "Cut", "Cuts", "FrameFormatError", "plan_frames"]


@dataclass(frozen=True)
class FramesPlan:
    """How a run of stored frames becomes raw bytes on the GPU (runtime_shim.gpu_upload cuts it per segment).

    All arrays are numpy int64, sorted by frame. Chunks are nvCOMP zstd frames; jobs are runs of the plane kernel
    (JOB_WORDS layout), at most one per frame. Offsets, not addresses:
    - ``chunk_in`` and stage pointers (``job_kind`` PTR_STAGE): offsets in the buffer planned from;
    - scratch pointers (PTR_SCRATCH) and ``chunk_out`` unless ``chunk_to_dst``: offsets in a scratch area where frame
      f owns ``[frame_scratch[f], frame_scratch[f + 1])``;
    - ``job_out`` and ``chunk_out`` when ``chunk_to_dst``: offsets from the upload's device base.
    ``dep_pos`` / ``dep_val``: every byte the plan was derived from (frame headers, chunk tables) and its value, so
    that bytes read again later (the ones copied to the GPU) can be checked to be the ones planned.
    """

    chunk_frame: Any
    chunk_in: Any
    chunk_size: Any
    chunk_raw: Any
    chunk_out: Any
    chunk_to_dst: Any
    chunk_walk: Any  # a chunk of a chunked plane (its blocks are walked: zstd_heads.check_zstd_heads)
    job_frame: Any
    job_out: Any
    job_ptr: Any  # (jobs, 8)
    job_kind: Any  # (jobs, 8) PTR_*
    job_n: Any
    job_es: Any
    job_rot: Any
    frame_scratch: Any  # (frames + 1,) exclusive running sum of each frame's scratch bytes
    dep_frame: Any
    dep_pos: Any
    dep_val: Any


class Cut(NamedTuple):
    """The part of a FramesPlan for frames [lo, hi), moved to where those frames now lie (a segment in staging):
    stage offsets are the segment's, scratch offsets its own scratch area's (``scratch_bytes``)."""

    chunk_in: Any
    chunk_size: Any
    chunk_raw: Any
    chunk_out: Any
    chunk_to_dst: Any
    chunk_frame: Any  # frame index in the segment (for error messages)
    job_out: Any
    job_ptr: Any
    job_kind: Any
    job_n: Any
    job_es: Any
    job_rot: Any
    scratch_bytes: int


class Cuts:
    """A FramesPlan cut in segments: frames [lo, hi) of each segment lie back to back in one buffer, frame f at its
    planned offset + ``delta[f]``. Everything that does not depend on the bytes read is moved once, here, for all
    segments (vectorized); ``cut()`` per segment then only slices and checks the bytes the plan was derived from."""

    def __init__(self, plan: FramesPlan, segments: list[tuple[int, int]], delta: Any) -> None:
        import numpy as np

        self.plan = plan
        self.chunk_start, self.job_start, self.dep_start = plan_starts(plan)
        first = np.zeros(len(plan.frame_scratch) - 1, dtype=np.int64)  # each frame's segment's first frame
        for lo, hi in segments:
            first[lo:hi] = lo
        s0 = plan.frame_scratch[:-1][first]  # where each frame's segment's scratch area starts
        cf, jf = plan.chunk_frame, plan.job_frame
        self.chunk_in = plan.chunk_in + delta[cf]
        self.chunk_out = np.where(plan.chunk_to_dst, plan.chunk_out, plan.chunk_out - s0[cf])
        kind = plan.job_kind
        self.job_ptr = np.where(
            kind == PTR_STAGE,
            plan.job_ptr + delta[jf][:, None],
            np.where(kind == PTR_SCRATCH, plan.job_ptr - s0[jf][:, None], 0),
        )
        self.dep_pos = plan.dep_pos + delta[plan.dep_frame]

    def cut(self, lo: int, hi: int, buf: Any) -> Cut:
        """The part for segment [lo, hi), whose bytes are in ``buf``. Raises FrameFormatError (frame index in the
        segment) when a byte the plan was derived from differs in ``buf`` (the frame changed after it was planned,
        and the plan must not be used on it), or when a zstd chunk in ``buf`` is not one sound frame that fills it
        (zstd_heads.check_zstd_heads)."""
        import numpy as np

        p = self.plan
        d0, d1 = self.dep_start[lo], self.dep_start[hi]
        if d1 > d0:
            differs = buf[self.dep_pos[d0:d1]] != p.dep_val[d0:d1]
            if differs.any():
                raise FrameFormatError(
                    int(p.dep_frame[d0:d1][np.argmax(differs)]) - lo,
                    "its header differs from the one read when the upload was planned: the file changed while being read",
                )
        c0, c1, j0, j1 = self.chunk_start[lo], self.chunk_start[hi], self.job_start[lo], self.job_start[hi]
        # Every chunk is checked in the very bytes that go to the GPU, here rather than when planning: the planner
        # then touches only frame headers and chunk tables of the mapped file (half its time went to the pages
        # holding chunk headers), and what nvCOMP gets cannot have changed since it was checked.
        frame, start, size, raw, walk = (
            p.chunk_frame[c0:c1] - lo,
            self.chunk_in[c0:c1],
            p.chunk_size[c0:c1],
            p.chunk_raw[c0:c1],
            p.chunk_walk[c0:c1],
        )
        native = native_helper()
        if native is not None:  # the same checks in one C call (numpy's ~40 calls took ~0.4 ms a segment)
            bad = native.check_chunks(buf, start, size, raw, walk, ZSTD_MAX_BLOCKS)
            if bad is not None:
                raise FrameFormatError(int(frame[bad[0]]), bad[1])
        else:
            check_zstd_heads(buf, frame, start, size, raw, walk)
        return Cut(
            chunk_in=self.chunk_in[c0:c1],
            chunk_size=p.chunk_size[c0:c1],
            chunk_raw=p.chunk_raw[c0:c1],
            chunk_out=self.chunk_out[c0:c1],
            chunk_to_dst=p.chunk_to_dst[c0:c1],
            chunk_frame=p.chunk_frame[c0:c1] - lo,
            job_out=p.job_out[j0:j1],
            job_ptr=self.job_ptr[j0:j1],
            job_kind=p.job_kind[j0:j1],
            job_n=p.job_n[j0:j1],
            job_es=p.job_es[j0:j1],
            job_rot=p.job_rot[j0:j1],
            scratch_bytes=int(p.frame_scratch[hi] - p.frame_scratch[lo]),
        )


def plan_starts(plan: FramesPlan) -> tuple[Any, Any, Any]:
    """Per frame (and one past the last): index of its first chunk, job and dependency byte in ``plan``."""
    import numpy as np

    edges = np.arange(len(plan.frame_scratch))
    return tuple(np.searchsorted(a, edges) for a in (plan.chunk_frame, plan.job_frame, plan.dep_frame))  # type: ignore[return-value]


def _within(values: Any, counts: Any) -> Any:
    """For consecutive groups of ``counts`` values: each value's exclusive running sum inside its group."""
    import numpy as np

    run = np.cumsum(values) - values
    firsts = np.cumsum(counts) - counts
    base = np.zeros(len(counts), dtype=np.int64)
    base[counts > 0] = run[firsts[counts > 0]]
    return run - np.repeat(base, counts)


def _group_sums(values: Any, counts: Any) -> Any:
    """The sum of each consecutive group of ``counts`` values (0 for an empty group, unlike np.add.reduceat)."""
    import numpy as np

    ends = np.concatenate(([0], np.cumsum(values)))
    bounds = np.concatenate(([0], np.cumsum(counts)))
    return ends[bounds[1:]] - ends[bounds[:-1]]


def _fail(bad: Any, frames: Any, message: Any) -> None:
    """Raise FrameFormatError for the first True in ``bad`` (``message(i)`` words it)."""
    import numpy as np

    if bad.any():
        i = int(np.argmax(bad))
        raise FrameFormatError(int(frames[i]), message(i))


def _fail_first(frames: Any, *rules: tuple[Any, Any]) -> None:
    """Raise FrameFormatError for the first element that breaks any of ``rules`` (``(bad, message)`` over the same
    elements), with the first rule it breaks: what a check element by element, rule by rule, says first."""
    import numpy as np

    broken = np.zeros(len(frames), dtype=bool)
    for bad, _ in rules:
        broken |= bad
    if broken.any():
        i = int(np.argmax(broken))
        message = next(message for bad, message in rules if bad[i])
        raise FrameFormatError(int(frames[i]), message(i))


class _Reads:
    """Gathers bytes from the planned buffer and keeps every one it read, with its frame: the plan's dependencies
    are exactly the bytes it was derived from, even if the buffer (a mapped file) changes while it is planned."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf
        self.frames: list[Any] = []
        self.pos: list[Any] = []
        self.val: list[Any] = []

    def bytes(self, frames: Any, pos: Any, n: int) -> Any:
        """(len(pos), n) int64: bytes pos .. pos+n-1 (callers have checked that they lie inside each frame)."""
        import numpy as np

        at = pos[:, None] + np.arange(n)
        got = self.buf[at]
        self.frames.append(np.repeat(frames, n))
        self.pos.append(at.ravel())
        self.val.append(got.ravel())
        return got.astype(np.int64)

    def u32(self, frames: Any, pos: Any) -> Any:
        return le_rows(self.bytes(frames, pos, 4))


def plan_frames(buf: Any, off: Any, size: Any, raw: Any, es: Any, enc: Any, dst: Any) -> FramesPlan:
    """Plan the GPU decode of many stored frames at once, in numpy (per-frame Python would bound the upload).

    ``buf``: uint8 array holding the stored frames (the mapped weight file, or a segment); per frame, int64
    arrays: offset in ``buf``, stored size, raw size, element size, ENC_* and destination offset. Same format
    rules as store.decode.decode_frame_into (store/format.py), every range is checked to lie inside its frame before anything is read
    from it; every zstd range's header is checked when the plan is cut for a segment (Cuts.cut), in the bytes that
    go to the GPU: nvCOMP must only ever see sound input. Raises FrameFormatError.
    """
    import numpy as np

    i64, F = np.int64, len(off)
    frames = np.arange(F)

    def zeros8(k: int) -> Any:
        return np.zeros((k, 8), dtype=i64)

    reads = _Reads(buf)
    chunks: list[tuple[Any, ...]] = []  # (frame, in, size, raw, out, to_dst, walk: a chunk of a chunked plane)
    jobs: list[tuple[Any, ...]] = []  # (frame, out, ptr, kind, n, es, rot)
    need = np.zeros(F, dtype=i64)  # scratch bytes per frame

    def job_block(idx: Any, ptr: Any, kind: Any, n: Any, e: Any, rot: int) -> None:
        jobs.append((idx, dst[idx], ptr, kind, n, e, np.full(len(idx), rot, dtype=i64)))

    _fail(raw <= 0, frames, lambda i: fmt.msg_empty_frame(raw[i]))
    _fail(
        off + size > len(buf), frames, lambda i: f"the frame ends at {off[i] + size[i]}, past the {len(buf)} bytes read"
    )

    # stored as is: the kernel copies them from staging (es 1), so they cost no copy call of their own
    idx = frames[enc == ENC_NONE]
    _fail(size[idx] != raw[idx], idx, lambda i: fmt.msg_stored_size(size[idx][i], raw[idx][i]))
    ptr, kind = zeros8(len(idx)), zeros8(len(idx))
    ptr[:, 0], kind[:, 0] = off[idx], PTR_STAGE
    job_block(idx, ptr, kind, raw[idx], np.ones(len(idx), dtype=i64), 0)

    # one zstd frame straight into place
    idx = frames[(enc == ENC_ZSTD) | ((enc == ENC_BYTEPLANE) & (es == 1))]
    chunks.append(
        (idx, off[idx], size[idx], raw[idx], dst[idx], np.ones(len(idx), dtype=bool), np.zeros(len(idx), dtype=bool))
    )

    bp = frames[(enc == ENC_BYTEPLANE) & (es > 1)]
    _fail(raw[bp] % es[bp] != 0, bp, lambda i: fmt.msg_not_whole_elements(raw[bp][i], es[bp][i]))
    tag = np.zeros(len(bp), dtype=i64)
    long_enough = size[bp] >= 4
    tag[long_enough] = reads.u32(bp[long_enough], off[bp][long_enough])
    l1, f2 = bp[tag != _TAG], bp[tag == _TAG]
    need[l1] = raw[l1]

    # layout 2: header, planes raw / one zstd frame / chunked, joined and rotated back
    _fail(~np.isin(es[f2], fmt.PLANE_WIDTHS), f2, lambda i: fmt.msg_element_size(es[f2][i]))
    e = es[f2]
    head = len(PLANES_TAG) + fmt.PLANE_ENTRY.size * e  # fmt.plane_header_size, per frame
    _fail(
        size[f2] < head,
        f2,
        lambda i: fmt.msg_plane_header_short(size[f2][i], head[i]),
    )
    pf = np.repeat(f2, e)  # frame of each plane
    pk = np.arange(len(pf)) - np.repeat(np.cumsum(e) - e, e)  # plane number in its frame
    hpos = off[pf] + len(PLANES_TAG) + fmt.PLANE_ENTRY.size * pk
    fields = reads.bytes(pf, hpos, fmt.PLANE_ENTRY.size)
    mode = fields[:, 0]
    psize = le_rows(fields[:, 1:])
    pn = raw[pf] // es[pf]
    pstart = np.repeat(off[f2] + head, e) + _within(psize, e)
    fend = off[pf] + size[pf]
    _fail_first(  # plane by plane, as format.plane_table checks them
        pf,
        (~np.isin(mode, fmt.PLANE_MODES), lambda i: fmt.msg_unknown_mode(pk[i], mode[i])),
        (pstart + psize > fend, lambda i: fmt.msg_plane_overruns(pk[i], psize[i], max(0, fend[i] - pstart[i]))),
        ((mode == fmt.PLANE_RAW) & (psize != pn), lambda i: fmt.msg_plane_size(pk[i], psize[i], pn[i])),
    )
    spare = size[f2] - head - _group_sums(psize, e)
    _fail(spare != 0, f2, lambda i: fmt.msg_after_planes(spare[i]))
    zp = mode != fmt.PLANE_RAW
    zbytes = np.where(zp, pn, 0)
    np.add.at(need, pf, zbytes)
    frame_scratch = np.concatenate(([0], np.cumsum(need))).astype(i64)
    pscratch = frame_scratch[pf] + _within(zbytes, e)

    # layout 1: one zstd frame of the planes, decoded aside and joined without rotation
    at, n = frame_scratch[l1], raw[l1] // es[l1]
    chunks.append((l1, off[l1], size[l1], raw[l1], at, np.zeros(len(l1), dtype=bool), np.zeros(len(l1), dtype=bool)))
    ptr, kind = zeros8(len(l1)), zeros8(len(l1))
    for k in range(8):
        has = es[l1] > k
        ptr[has, k], kind[has, k] = at[has] + k * n[has], PTR_SCRATCH
    job_block(l1, ptr, kind, n, es[l1], 0)

    one = mode == fmt.PLANE_ZSTD
    chunks.append(
        (
            pf[one],
            pstart[one],
            psize[one],
            pn[one],
            pscratch[one],
            np.zeros(int(one.sum()), dtype=bool),
            np.zeros(int(one.sum()), dtype=bool),
        )
    )
    m2 = np.nonzero(mode == fmt.PLANE_ZSTD_CHUNKS)[0]
    _fail(
        psize[m2] < fmt.CHUNK_TABLE_HEAD.size,
        pf[m2],
        lambda i: fmt.msg_chunk_table_short(psize[m2][i]),
    )
    sub, count = reads.u32(pf[m2], pstart[m2]), reads.u32(pf[m2], pstart[m2] + 4)
    want = -(-pn[m2] // np.maximum(sub, 1))
    _fail(
        (sub < PLANE_CHUNK) | (count != want),
        pf[m2],
        lambda i: fmt.msg_chunk_table(count[i], sub[i], pn[m2][i]),
    )
    table_end = fmt.CHUNK_TABLE_HEAD.size + fmt.CHUNK_ENTRY * count
    _fail(
        table_end > psize[m2],
        pf[m2],
        lambda i: fmt.msg_chunk_table_overflows(count[i], psize[m2][i]),
    )
    cp = np.repeat(m2, count)  # plane of each chunk
    ci = np.arange(len(cp)) - np.repeat(np.cumsum(count) - count, count)
    csize = reads.u32(pf[cp], pstart[cp] + fmt.CHUNK_TABLE_HEAD.size + fmt.CHUNK_ENTRY * ci)
    cin = np.repeat(pstart[m2] + table_end, count) + _within(csize, count)
    used = table_end + _group_sums(csize, count)
    _fail(used != psize[m2], pf[m2], lambda i: fmt.msg_chunk_sizes(used[i], psize[m2][i]))
    csub = np.repeat(sub, count)
    chunks.append(
        (
            pf[cp],
            cin,
            csize,
            np.minimum(csub, pn[cp] - ci * csub),
            pscratch[cp] + ci * csub,
            np.zeros(len(cp), dtype=bool),
            np.ones(len(cp), dtype=bool),
        )
    )
    ptr, kind = zeros8(len(f2)), zeros8(len(f2))
    row = np.repeat(np.arange(len(f2)), e)
    ptr[row, pk] = np.where(zp, pscratch, pstart)
    kind[row, pk] = np.where(zp, PTR_SCRATCH, PTR_STAGE)
    job_block(f2, ptr, kind, raw[f2] // e, e, 1)

    c = [np.concatenate(col) for col in zip(*chunks)]
    j = [np.concatenate(col) for col in zip(*jobs)]
    co, jo = np.argsort(c[0], kind="stable"), np.argsort(j[0], kind="stable")
    dep_frame = np.concatenate(reads.frames) if reads.frames else np.zeros(0, dtype=i64)
    do = np.argsort(dep_frame, kind="stable")
    dep_pos = (np.concatenate(reads.pos) if reads.pos else np.zeros(0, dtype=i64))[do]
    dep_val = (np.concatenate(reads.val) if reads.val else np.zeros(0, dtype=np.uint8))[do]
    return FramesPlan(
        chunk_frame=c[0][co],
        chunk_in=c[1][co],
        chunk_size=c[2][co],
        chunk_raw=c[3][co],
        chunk_out=c[4][co],
        chunk_to_dst=c[5][co],
        chunk_walk=c[6][co],
        job_frame=j[0][jo],
        job_out=j[1][jo],
        job_ptr=j[2][jo],
        job_kind=j[3][jo],
        job_n=j[4][jo],
        job_es=j[5][jo],
        job_rot=j[6][jo],
        frame_scratch=frame_scratch,
        dep_frame=dep_frame[do],
        dep_pos=dep_pos,
        dep_val=dep_val,
    )
