"""Where an upload's bytes go: each blob's place in the one device allocation, and its frames cut into pinned-slot
segments (raw frames for the host decoder, stored frames for the GPU decoder).

Pure arithmetic over the store's tables; nothing here touches the GPU.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ..store.format import ENCODING_CODES, PLANE_CHUNK
from ..store.reader import WeightReader

DEVICE_ALIGNMENT = 256  # cudaMalloc's own alignment: what TensorRT expects of weight pointers
DEVICE_SEGMENT = 16 << 20  # stored bytes per segment on the GPU decode path (fewer, bigger numpy passes)
READ_RUN = 4 << 20  # one read call (one thread) per this many bytes of back-to-back frames


class HostSegment(NamedTuple):
    """Raw frames decoded on the host into one slot, then copied to the device in one call."""

    dev_offset: int  # start of the device range (the first frame's)
    size: int  # bytes copied, alignment gaps included
    frames: tuple[tuple[int, int, int], ...]  # (blob, frame, offset in the segment)


class StoredSegment(NamedTuple):
    """Stored frames ``lo:hi`` of the frame table, read into one slot by ``runs`` (frame ranges back to back in the
    file, one read call each)."""

    lo: int
    hi: int
    runs: list[tuple[int, int]]


def device_layout(reader: WeightReader, indices: list[int]) -> tuple[dict[int, int], int]:
    """Each blob's offset in the upload's device allocation (DEVICE_ALIGNMENT apart), and the allocation's size."""
    offsets, pos = {}, 0
    for i in indices:
        pos = -(-pos // DEVICE_ALIGNMENT) * DEVICE_ALIGNMENT
        offsets[i] = pos
        pos += reader.store.blobs[i].nbytes
    return offsets, max(pos, 1)


def host_segments(
    reader: WeightReader, indices: list[int], offsets: dict[int, int], slot_bytes: int
) -> list[HostSegment]:
    """The blobs' frames in order, cut where the next frame's raw bytes would overflow a slot."""
    out: list[HostSegment] = []
    start, end, frames = -1, -1, list[tuple[int, int, int]]()
    for i in indices:
        pos = offsets[i]
        for j, f in enumerate(reader.store.blobs[i].frames):
            if frames and pos + f.raw_size - start > slot_bytes:
                out.append(HostSegment(start, end - start, tuple(frames)))
                frames = []
            if not frames:
                start = pos
            frames.append((i, j, pos - start))
            pos += f.raw_size
            end = pos
    if frames:
        out.append(HostSegment(start, end - start, tuple(frames)))
    return out


def frame_table(reader: WeightReader, order: list[int], offsets: dict[int, int]) -> dict[str, Any]:
    """Per frame of the upload, in order, as numpy int64 arrays: blob, frame, stored size, raw size, element size,
    encoding (ENCODING_CODES), device offset of its raw bytes, file offset, and the most zstd chunks it can hold
    (planes in chunks of PLANE_CHUNK or more)."""
    cols: dict[str, list[int]] = {k: [] for k in ("blob", "frame", "size", "raw", "es", "enc", "dst", "file", "chunks")}
    for i in order:
        b = reader.store.blobs[i]
        dst, enc = offsets[i], ENCODING_CODES[b.encoding]
        planes = b.element_size if b.encoding == "zstd-byteplane" and b.element_size > 1 else 1
        for j, f in enumerate(b.frames):
            for k, v in (
                ("blob", i),
                ("frame", j),
                ("size", f.size),
                ("raw", f.raw_size),
                ("es", b.element_size),
                ("enc", enc),
                ("dst", dst),
                ("file", f.offset),
            ):
                cols[k].append(v)
            cols["chunks"].append(
                0 if b.encoding == "none" else planes * max(1, -(-f.raw_size // planes // PLANE_CHUNK))
            )
            dst += f.raw_size
    return {k: np.array(v, dtype=np.int64) for k, v in cols.items()}


def pack_stored(t: dict[str, Any], slot_bytes: int, raw_cap: int | None = None) -> list[StoredSegment]:
    """Cut the frames of ``frame_table`` into segments of at most ``slot_bytes`` stored bytes, back to back in the
    slot (sets t["slot_off"]), and of at most ``raw_cap`` raw bytes (a GPU batch decodes at most that much: a few kB
    of stored zeros can stand for megabytes); read runs hold at most READ_RUN bytes unless one frame is bigger."""
    size, file, raw = t["size"].tolist(), t["file"].tolist(), t["raw"].tolist()
    raw_cap = raw_cap or sum(raw) + 1
    slot_off = np.zeros(len(size), dtype=np.int64)
    segments: list[StoredSegment] = []
    lo, used, decoded, runs, run_lo, run_bytes = 0, 0, 0, [], 0, 0
    for k, n in enumerate(size):
        if k > lo and (used + n > slot_bytes or decoded + raw[k] > raw_cap):
            runs.append((run_lo, k))
            segments.append(StoredSegment(lo, k, runs))
            lo, used, decoded, runs, run_lo, run_bytes = k, 0, 0, [], k, 0
        elif k > run_lo and (file[k] != file[k - 1] + size[k - 1] or run_bytes + n > READ_RUN):
            runs.append((run_lo, k))
            run_lo, run_bytes = k, 0
        slot_off[k] = used
        used += n
        decoded += raw[k]
        run_bytes += n
    if size:
        runs.append((run_lo, len(size)))
        segments.append(StoredSegment(lo, len(size), runs))
    t["slot_off"] = slot_off
    return segments
