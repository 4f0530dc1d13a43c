"""The check of every zstd range of a GPU segment before nvCOMP sees it: format.check_zstd, vectorized over arrays.

Used by the planner when it cuts a plan for a segment (planner.Cuts.cut) where the C helper (store/_planes.c,
check_chunks) is not built; both name the first bad range with the first rule it breaks, in format.py's words.
"""

from __future__ import annotations

from typing import Any

from ..store import format as fmt
from ..store.format import ZSTD_MAX_BLOCKS, FormatError


class FrameFormatError(FormatError):
    """A stored frame that does not parse; ``frame`` is its index in the segment."""

    def __init__(self, frame: int, message: str) -> None:
        super().__init__(message)
        self.frame = frame


def le_rows(b: Any) -> Any:
    """Each row of bytes as a little-endian unsigned number, int64 (capped at 2**62: sizes that large are refused
    anyway, and the cap keeps 8-byte fields from wrapping negative)."""
    import numpy as np

    v = np.zeros(len(b), dtype=np.uint64)
    for k in range(b.shape[1]):
        v |= b[:, k].astype(np.uint64) << np.uint64(8 * k)
    return np.minimum(v, np.uint64(fmt.ZSTD_SIZE_CAP)).astype(np.int64)


def check_zstd_heads(buf: Any, frame: Any, start: Any, size: Any, raw: Any, walk: Any) -> None:
    """Every zstd range must start with a standard zstd frame header that promises its planned size: format.check_zstd
    for all ranges at once. nvCOMP is undefined on anything else, so this is checked on the host for every range (a
    damaged or misplaced chunk table fails). Unlike the host decoder, which lets a whole frame leave out its content
    size, every range here must say it (nvCOMP sizes its output by it). The chunks of chunked planes (``walk``) are
    walked block by block (at most ZSTD_MAX_BLOCKS vectorized steps); other zstd ranges are whole frames of up to a
    frame's size, whose many blocks this walk would take long to follow. The first range that breaks a rule is named,
    with the first rule it breaks: what a range-by-range check (format.py, the C helper) names."""
    import numpy as np

    if not len(buf):  # every range then fails its first rule; reads still need a byte to clip to
        buf = np.zeros(1, dtype=np.uint8)
    last = len(buf) - 1

    def read(pos: Any, n: int) -> Any:  # (len(pos), n) int64: bytes pos .. pos+n-1 (clipped: failed ranges read junk)
        return buf[np.minimum(pos[:, None] + np.arange(n), last)].astype(np.int64)

    failed = np.zeros(len(frame), dtype=bool)
    rule_of = np.zeros(len(frame), dtype=np.int64)
    messages: list[Any] = []

    def rule(broken: Any, message: Any) -> None:
        new = broken & ~failed
        rule_of[new] = len(messages)
        messages.append(message)
        failed[new] = True

    rule(size < fmt.ZSTD_MIN_FRAME, lambda i: fmt.msg_zstd_short(size[i]))
    head = read(start, 5)
    rule(le_rows(head[:, :4]) != fmt.ZSTD_MAGIC, lambda i: fmt.msg_zstd_magic(start[i]))
    fhd = head[:, 4]
    single, did, fcs_flag = (fhd >> 5) & 1, fhd & 3, fhd >> 6
    rule(did != 0, lambda i: fmt.msg_zstd_dictionary(start[i]))
    fcs_size = np.where(fcs_flag == 0, single, 1 << fcs_flag)  # 0 (absent), 1, 2, 4 or 8 bytes: fmt.zstd_fcs_width
    rule(fcs_size == 0, lambda i: fmt.msg_zstd_no_size(start[i]))
    at = start + 5 + (1 - single)
    rule(at + fcs_size + fmt.ZSTD_BLOCK_HEADER > start + size, lambda i: fmt.msg_zstd_header_short(size[i]))
    value = np.zeros(len(frame), dtype=np.int64)
    for width in (1, 2, 4, 8):
        sel = fcs_size == width
        if sel.any():
            value[sel] = le_rows(read(at[sel], width)) + (fmt.ZSTD_FCS2_BIAS if width == 2 else 0)
    rule(value != raw, lambda i: fmt.msg_zstd_size(start[i], value[i], raw[i]))
    # The frame must end exactly where its chunk does (nvCOMP gets the chunk's bytes; the host decoder runs frame after
    # frame): walk the block headers, all chunks at once, at most ZSTD_MAX_BLOCKS steps.
    end = start + size
    pos = at + fcs_size  # the first block header
    open_ = walk.astype(bool)  # chunks whose last block is not reached yet
    bad = failed.copy()
    for _ in range(ZSTD_MAX_BLOCKS):
        idx = np.nonzero(open_ & ~bad)[0]
        if not len(idx):
            break
        fits = pos[idx] + fmt.ZSTD_BLOCK_HEADER <= end[idx]
        bad[idx[~fits]] = True
        idx = idx[fits]
        bh = le_rows(read(pos[idx], fmt.ZSTD_BLOCK_HEADER))
        kind = (bh >> 1) & 3
        bad[idx[kind == 3]] = True  # reserved block type
        pos[idx] += fmt.ZSTD_BLOCK_HEADER + np.where(kind == 1, 1, bh >> 3)  # an RLE block stores one byte
        open_[idx[(bh & 1) == 1]] = False
    pos += fmt.ZSTD_CHECKSUM * ((fhd >> 2) & 1)
    rule(walk & (bad | open_ | (pos != end)), lambda i: fmt.msg_zstd_not_one_frame(start[i], size[i]))
    if failed.any():
        i = int(np.argmax(failed))
        raise FrameFormatError(int(frame[i]), messages[int(rule_of[i])](i))
