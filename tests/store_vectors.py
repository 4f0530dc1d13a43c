"""Shared test vectors of the weight store format: sound frames and frames broken in one way each.

Every decoder of the store must accept and refuse these alike, with a message of the same kind: format.py's checker
(the reference), the host decoder with its C helper and with numpy, and the GPU planner (tests/test_store_vectors.py).
A kind names the format.py message builder whose words the refusal uses (KINDS).
"""

from __future__ import annotations

import functools
import inspect
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard

from runtime_shim.store import format as fmt
from runtime_shim.store.format import CHUNK_TABLE_HEAD, PLANE_CHUNK, PLANE_ENTRY, PLANES_TAG

# kind -> the format.py builder of that message
BUILDERS: dict[str, Callable[..., str]] = {
    "element size": fmt.msg_element_size,
    "not whole elements": fmt.msg_not_whole_elements,
    "stored size": fmt.msg_stored_size,
    "plane header short": fmt.msg_plane_header_short,
    "unknown mode": fmt.msg_unknown_mode,
    "plane overruns": fmt.msg_plane_overruns,
    "plane size": fmt.msg_plane_size,
    "after planes": fmt.msg_after_planes,
    "chunk table short": fmt.msg_chunk_table_short,
    "chunk table": fmt.msg_chunk_table,
    "chunk table overflows": fmt.msg_chunk_table_overflows,
    "chunk sizes": fmt.msg_chunk_sizes,
    "zstd short": fmt.msg_zstd_short,
    "zstd magic": fmt.msg_zstd_magic,
    "zstd dictionary": fmt.msg_zstd_dictionary,
    "zstd no size": fmt.msg_zstd_no_size,
    "zstd header short": fmt.msg_zstd_header_short,
    "zstd size": fmt.msg_zstd_size,
    "zstd not one frame": fmt.msg_zstd_not_one_frame,
}


def _pattern(builder: Callable[..., str]) -> re.Pattern[str]:
    """The builder's text with every argument a wildcard."""
    n = len(inspect.signature(builder).parameters)
    text = re.escape(builder(*[f"@@{i}@@" for i in range(n)]))
    for i in range(n):
        text = text.replace(f"@@{i}@@", ".+?")
    return re.compile(text)


KINDS = {kind: _pattern(builder) for kind, builder in BUILDERS.items()}


def kind_of(message: str) -> str:
    """The kind of a refusal's message, or ``other: <message>`` when no format.py builder made it."""
    found = [kind for kind, pattern in KINDS.items() if pattern.search(message)]
    return found[0] if len(found) == 1 else f"other: {message}"


@dataclass(frozen=True)
class Vector:
    """One stored frame and what every decoder must make of it: ``expect`` None (decodes, to ``raw`` where given) or
    the kind of its refusal. ``planner``: where the GPU planner is documented to differ ("same" otherwise)."""

    name: str
    stored: bytes
    encoding: str
    element_size: int
    raw_size: int
    expect: str | None
    raw: bytes | None = None
    planner: str | None = "same"

    @property
    def planner_expect(self) -> str | None:
        return self.expect if self.planner == "same" else self.planner


# --------------------------------------------------------------------------- building blocks
N = 2 * PLANE_CHUNK + 4096  # bytes per plane: two whole chunks and a short last one
_MAGIC = struct.pack("<I", fmt.ZSTD_MAGIC)


def zstd(content: bytes, **params: object) -> bytes:
    """A standard zstd frame of ``content`` (content size in the header unless told otherwise)."""
    return zstandard.ZstdCompressor(level=3, **params).compress(content)


def raw_blocks_frame(pieces: list[bytes]) -> bytes:
    """One zstd frame of raw blocks (single segment, 4-byte content size; legal zstd, though the writer makes one
    compressed block per chunk)."""
    size = sum(len(p) for p in pieces)
    body = b"".join(struct.pack("<I", len(p) << 3 | (k == len(pieces) - 1))[:3] + p for k, p in enumerate(pieces))
    return _MAGIC + b"\xa0" + struct.pack("<I", size) + body


def rle_frame(byte: int, size: int) -> bytes:
    """One zstd frame of one RLE block (one stored byte for ``size`` bytes)."""
    return _MAGIC + b"\xa0" + struct.pack("<I", size) + struct.pack("<I", size << 3 | 2 | 1)[:3] + bytes([byte])


def windowed_frame(content: bytes) -> bytes:
    """One raw-block zstd frame with a window descriptor (not single segment) and a 2-byte content size."""
    head = _MAGIC + b"\x40" + b"\x30" + struct.pack("<H", len(content) - fmt.ZSTD_FCS2_BIAS)  # window 2**16
    return head + struct.pack("<I", len(content) << 3 | 1)[:3] + content


def skippable(payload: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(payload)) + payload


def chunked(chunks: list[bytes], *, sub: int = PLANE_CHUNK, count: int | None = None, sizes: list[int] | None = None):
    """A chunked plane (mode 2): its table (sizes of ``chunks`` unless told otherwise) and the chunks."""
    sizes = [len(c) for c in chunks] if sizes is None else sizes
    count = len(sizes) if count is None else count
    return CHUNK_TABLE_HEAD.pack(sub, count) + struct.pack(f"<{len(sizes)}I", *sizes) + b"".join(chunks)


def layout2(planes: list[tuple[int, bytes]]) -> bytes:
    """A layout-2 frame: the tag, (mode, stored size) per plane, the planes."""
    return PLANES_TAG + b"".join(PLANE_ENTRY.pack(m, len(d)) for m, d in planes) + b"".join(d for _, d in planes)


def joined(planes: list[bytes]) -> bytes:
    """The raw bytes byte planes decode to (little-endian elements, rotated right by one bit)."""
    es = len(planes)
    x = np.zeros(len(planes[0]), dtype=np.uint64)
    for k, p in enumerate(planes):
        x |= np.frombuffer(p, dtype=np.uint8).astype(np.uint64) << np.uint64(8 * k)
    x = (x >> np.uint64(1)) | ((x & np.uint64(1)) << np.uint64(8 * es - 1))
    return x.astype(f"<u{es}").tobytes()


LOW = np.random.default_rng(1).integers(0, 256, N, dtype=np.uint8).tobytes()  # plane 0, stored raw
HIGH = (np.arange(N) // 1000 % 7 + 60).astype(np.uint8).tobytes()  # plane 1, compressible
PIECES = [HIGH[i : i + PLANE_CHUNK] for i in range(0, N, PLANE_CHUNK)]
CHUNKS = [zstd(p) for p in PIECES]


def two_planes(plane1: bytes, mode: int = fmt.PLANE_ZSTD_CHUNKS, plane0: bytes = LOW) -> bytes:
    """Element size 2: plane 0 raw, plane 1 in the given mode."""
    return layout2([(fmt.PLANE_RAW, plane0), (mode, plane1)])


def _with_chunk(k: int, chunk: bytes) -> bytes:
    """The sound chunked plane with chunk k replaced (its table entry follows it)."""
    chunks = list(CHUNKS)
    chunks[k] = chunk
    return two_planes(chunked(chunks))


def _bp(name: str, stored: bytes, expect: str | None, raw: bytes | None = None, **kw: object) -> Vector:
    return Vector(name, stored, "zstd-byteplane", 2, 2 * N, expect, raw, **kw)  # type: ignore[arg-type]


@functools.cache
def vectors() -> tuple[Vector, ...]:
    """Every vector, sound ones first."""
    from bundler.store_writer import encode_frame

    good = joined([LOW, HIGH])
    values = (np.random.default_rng(9).standard_normal(100_000) * 0.02).astype(np.float32).tobytes()
    writer = encode_frame(values, "zstd-byteplane", 4, 3)
    blocks64 = raw_blocks_frame([PIECES[0][i : i + 1024] for i in range(0, PLANE_CHUNK, 1024)])
    step65 = -(-PLANE_CHUNK // 65)
    blocks65 = raw_blocks_frame([PIECES[0][i : i + step65] for i in range(0, PLANE_CHUNK, step65)])
    no_size = zstd(PIECES[0], write_content_size=False)
    reserved_last = _MAGIC + b"\xa4" + struct.pack("<I", PLANE_CHUNK) + struct.pack("<I", 3 << 1 | 1)[:3] + b"\x00"
    sound = [
        Vector("the writer's frame", writer, "zstd-byteplane", 4, len(values), None, values),
        _bp("two chunks and a short last one", two_planes(chunked(CHUNKS)), None, good),
        _bp("a chunk of 64 raw blocks", _with_chunk(0, blocks64), None, good),
        _bp("a chunk of one RLE block", two_planes(chunked([rle_frame(7, PLANE_CHUNK)] * 2 + CHUNKS[2:])), None),
        _bp("a chunk with a window descriptor", _with_chunk(1, windowed_frame(PIECES[1])), None, good),
        _bp("a chunk with a checksum", _with_chunk(0, zstd(PIECES[0], write_checksum=True)), None, good),
        _bp("a plane in one zstd frame (mode 1)", two_planes(zstd(HIGH), fmt.PLANE_ZSTD), None, good),
        Vector("a layout-1 frame", zstd(LOW + HIGH), "zstd-byteplane", 2, 2 * N, None),
        Vector("a zstd frame", zstd(HIGH), "zstd", 1, N, None, HIGH),
        Vector("a none frame", HIGH, "none", 1, N, None, HIGH),
        # the GPU needs every zstd range to say its size (nvCOMP sizes its output by it); the host reads older
        # whole frames that do not
        Vector(
            "a zstd frame that does not say its size", no_size, "zstd", 1, PLANE_CHUNK, None, PIECES[0], "zstd no size"
        ),  # fmt: skip
        _bp(
            "a mode-1 plane that does not say its size",
            two_planes(zstd(HIGH, write_content_size=False), fmt.PLANE_ZSTD),
            None,
            good,
            planner="zstd no size",
        ),  # fmt: skip
    ]
    sub_chunk = PLANE_CHUNK // 2
    broken = [
        # plane tables
        _bp("a frame shorter than its plane header", PLANES_TAG + b"\x00" * 6, "plane header short"),
        _bp("an unknown plane mode", two_planes(chunked(CHUNKS), mode=7), "unknown mode"),
        _bp("a frame cut short", two_planes(chunked(CHUNKS))[:-1], "plane overruns"),
        _bp("a raw plane of the wrong size", two_planes(chunked(CHUNKS), plane0=LOW[:-1]), "plane size"),
        _bp("bytes after the last plane", two_planes(chunked(CHUNKS)) + b"\x00", "after planes"),
        Vector(
            "a raw size that is not whole elements",
            two_planes(chunked(CHUNKS)),
            "zstd-byteplane",
            2,
            2 * N + 1,
            "not whole elements",
        ),  # fmt: skip
        Vector("a none frame of the wrong size", HIGH[:-1], "none", 1, N, "stored size"),
        # chunk tables
        _bp("a chunk table shorter than its header", two_planes(b"\x00" * 5), "chunk table short"),
        _bp(
            "chunks smaller than PLANE_CHUNK",
            two_planes(chunked([zstd(HIGH[i : i + sub_chunk]) for i in range(0, N, sub_chunk)], sub=sub_chunk)),
            "chunk table",
        ),  # fmt: skip
        _bp("a chunk count that does not cover the plane", two_planes(chunked(CHUNKS[:2])), "chunk table"),
        _bp(
            "a chunk table that does not fit its plane",
            two_planes(CHUNK_TABLE_HEAD.pack(PLANE_CHUNK, 3)),
            "chunk table overflows",
        ),  # fmt: skip
        _bp(
            "chunk sizes that do not add up",
            two_planes(chunked(CHUNKS, sizes=[len(c) + 1 for c in CHUNKS])),
            "chunk sizes",
        ),  # fmt: skip
        # the chunk rule: exactly one zstd frame that fills its chunk
        _bp(
            "chunk sizes swapped (same total)",
            two_planes(chunked(CHUNKS, sizes=[len(CHUNKS[1]), len(CHUNKS[0]), len(CHUNKS[2])])),
            "zstd not one frame",
        ),  # fmt: skip
        _bp(
            "a skippable frame after a chunk",
            two_planes(chunked([CHUNKS[0] + skippable(b"junk"), *CHUNKS[1:]])),
            "zstd not one frame",
        ),  # fmt: skip
        _bp(
            "a chunk planned inside a skippable frame",
            two_planes(
                chunked(
                    [CHUNKS[0], skippable(CHUNKS[1]), CHUNKS[2]],
                    sizes=[len(CHUNKS[0]) + 8, len(CHUNKS[1]), len(CHUNKS[2])],
                )
            ),
            "zstd not one frame",
        ),  # fmt: skip
        _bp("bytes after a chunk's frame", _with_chunk(0, CHUNKS[0] + b"\x00" * 3), "zstd not one frame"),
        _bp("a chunk of 65 blocks", _with_chunk(0, blocks65), "zstd not one frame"),
        _bp("a chunk whose last block is cut", _with_chunk(0, blocks64[:-1]), "zstd not one frame"),
        _bp("a chunk ending in a reserved block", _with_chunk(0, reserved_last), "zstd not one frame"),
        _bp("a chunk that does not say its size", _with_chunk(0, no_size), "zstd no size"),
        _bp("a chunk that promises a byte less", _with_chunk(0, zstd(PIECES[0][:-1])), "zstd size"),
        _bp(
            "a chunk that promises a terabyte",
            _with_chunk(0, _MAGIC + b"\xe0" + struct.pack("<Q", 1 << 40) + CHUNKS[0][7:]),
            "zstd size",
        ),  # fmt: skip
        _bp(
            "a chunk that needs a dictionary",
            _with_chunk(0, CHUNKS[0][:4] + bytes([CHUNKS[0][4] | 1]) + CHUNKS[0][5:]),
            "zstd dictionary",
        ),  # fmt: skip
        _bp("a chunk without zstd's magic", _with_chunk(0, b"\x00" + CHUNKS[0][1:]), "zstd magic"),
        _bp("a chunk shorter than any zstd frame", _with_chunk(2, CHUNKS[2][:8]), "zstd short"),
        _bp(
            "a chunk shorter than its own header",
            _with_chunk(0, _MAGIC + b"\xc0\x30" + b"\x00" * 6),
            "zstd header short",
        ),  # fmt: skip
        # whole frames
        Vector("a zstd frame without zstd's magic", b"\x00" + zstd(HIGH)[1:], "zstd", 1, N, "zstd magic"),
        Vector("a zstd frame that promises more", zstd(HIGH + b"x"), "zstd", 1, N, "zstd size"),
        Vector("a zstd frame shorter than any", zstd(HIGH)[:8], "zstd", 1, N, "zstd short"),
        Vector("an empty zstd frame", b"", "zstd", 1, N, "zstd short"),
        _bp("a mode-1 plane that promises less", two_planes(zstd(HIGH[:-1]), fmt.PLANE_ZSTD), "zstd size"),
    ]
    return tuple(sound + broken)
