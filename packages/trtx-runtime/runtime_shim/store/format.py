"""The weight store's format rules, written once: constants, plane and chunk tables, the chunk rule, zstd header checks.

docs/WEIGHT_STORE.md describes the format; this module is its reference in code. The writer (bundler/store_writer.py),
the host decoder (decode.py, which also calls the optional C helper _planes.c) and the GPU planner
(runtime_shim.gpu.planner, vectorized over many frames) take their constants, table layouts and error texts from here,
and tests/store_vectors.py holds frames that all of them must accept or refuse alike. Stdlib only.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

# --------------------------------------------------------------------------- the file and its values
MAGIC = b"TRTXW\x00\x01\x00"  # "TRTXW", NUL, format version 1, reserved
HINT_CORRUPT = "the bundle's weight file is damaged or was modified; fetch the bundle again ('trtx-bundle verify' lists every bad file)"

ENCODINGS: tuple[str, ...] = ("none", "zstd", "zstd-byteplane")  # the manifest's names for a blob's encoding
# Numeric codes of the encodings, for code that handles many frames as arrays (the GPU planner).
ENC_NONE, ENC_ZSTD, ENC_BYTEPLANE = (ENCODINGS.index(e) for e in ("none", "zstd", "zstd-byteplane"))
ENCODING_CODES = {name: code for code, name in enumerate(ENCODINGS)}

# Bytes per element as stored; int4/uint4 pack two elements per byte (see nbytes_for).
ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "bool": 1,
    "float8e4m3fn": 1,
    "int4": 1,
    "uint4": 1,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # the ones a byte-plane split helps
PACKED_DTYPES = ("int4", "uint4")


def nbytes_for(dtype: str, shape: Iterable[int]) -> int:
    """Raw size of a tensor: little-endian elements, int4/uint4 packed two per byte (ONNX's layout)."""
    count = 1
    for d in shape:
        count *= int(d)
    return (count + 1) // 2 if dtype in PACKED_DTYPES else count * ITEMSIZE[dtype]


# --------------------------------------------------------------------------- zstd-byteplane frames, layout 2
# This tag, then per plane (u8 mode, u32 LE stored size), then the planes' stored bytes. A frame of layout 1 is one
# plain zstd frame, which starts with zstd's magic instead.
PLANES_TAG = b"BP2\x00"
PLANE_ENTRY = struct.Struct("<BI")
PLANE_WIDTHS = (2, 4, 8)  # element sizes that are split into planes
UINT_DTYPES = {2: "<u2", 4: "<u4", 8: "<u8"}  # each width as one unsigned integer (numpy dtype strings)
# Plane modes: 0 raw; 1 one zstd frame (read, no longer written); 2 a run of independent zstd frames, each decoding to
# a chunk of the plane (the last one to the rest), after a table of their sizes: a GPU decoder (nvCOMP) runs one chunk
# per thread block, so a 2 MiB plane in one frame would decode serially (bench/README.md, GPU decode).
PLANE_RAW, PLANE_ZSTD, PLANE_ZSTD_CHUNKS = 0, 1, 2
PLANE_MODES = (PLANE_RAW, PLANE_ZSTD, PLANE_ZSTD_CHUNKS)
# A chunk table: u32 LE raw bytes per chunk, u32 LE count, then count x u32 LE stored size. Chunks are at least
# PLANE_CHUNK raw bytes (the writer's size): readers may size their chunk arrays by it (gpu.upload does).
CHUNK_TABLE_HEAD = struct.Struct("<II")
CHUNK_ENTRY = 4
PLANE_CHUNK = 64 << 10


def plane_header_size(element_size: int) -> int:
    """Bytes of a layout-2 frame's tag and plane table."""
    return len(PLANES_TAG) + PLANE_ENTRY.size * element_size


# --------------------------------------------------------------------------- zstd frame headers (RFC 8878)
ZSTD_MAGIC = 0xFD2FB528
ZSTD_MIN_FRAME = 9  # magic, descriptor, a 1-byte content size, an empty last block
ZSTD_BLOCK_HEADER = 3
ZSTD_CHECKSUM = 4
ZSTD_FCS2_BIAS = 256  # a 2-byte content size field stores size - 256
# A chunk is one zstd frame of at most this many blocks (the writer's are one block each): every decoder walks the
# block headers to check that the frame ends with its chunk, and the GPU planner does so in this many vectorized steps.
ZSTD_MAX_BLOCKS = 64
ZSTD_SIZE_CAP = 1 << 62  # content sizes are capped here when read: larger ones are refused anyway and stay positive
# The most raw bytes one stored byte can decode to: a zstd block decodes to at most 128 KiB and takes at least 4 bytes
# (an RLE block: 3-byte header, 1 byte), and planes and chunk tables only add stored bytes. The index check caps frames by it.
ZSTD_MAX_RATIO = (128 << 10) // 4


def zstd_fcs_width(descriptor: int) -> int:
    """Bytes of the content size field a frame header descriptor announces (0: none)."""
    flag, single = descriptor >> 6, (descriptor >> 5) & 1
    return single if flag == 0 else 1 << flag


# --------------------------------------------------------------------------- error texts (ValueError messages)
# One builder per fault, for every decoder: the planner calls them lazily on the first bad frame of an array.
def msg_element_size(es: object) -> str:
    return f"element size {es}: expected 2, 4 or 8"


def msg_not_whole_elements(raw: object, es: object) -> str:
    return f"raw size {raw} is not a multiple of the element size {es}"


def msg_stored_size(size: object, raw: object) -> str:
    return f"stored {size} bytes, expected {raw}"


def msg_empty_frame(raw: object) -> str:
    return f"a frame of {raw} raw bytes (frames hold at least one byte)"


def msg_plane_header_short(size: object, head: object) -> str:
    return f"frame of {size} bytes is shorter than its plane header ({head} bytes)"


def msg_unknown_mode(k: object, mode: object) -> str:
    return f"plane {k}: unknown mode {mode}"


def msg_plane_overruns(k: object, size: object, left: object) -> str:
    return f"plane {k}: {size} bytes announced, {left} left in the frame"


def msg_plane_size(k: object, size: object, n: object) -> str:
    return f"plane {k} decodes to {size} bytes, expected {n}"


def msg_after_planes(extra: object) -> str:
    return f"{extra} bytes after the last plane"


def msg_chunk_table_short(size: object) -> str:
    return f"chunked plane of {size} bytes is shorter than its 8-byte table header"


def msg_chunk_table(count: object, sub: object, plane_bytes: object) -> str:
    return (
        f"chunk table says {count} chunks of {sub} bytes for a plane of {plane_bytes} bytes "
        f"(expected chunks of at least {PLANE_CHUNK} bytes covering the plane)"
    )


def msg_chunk_table_overflows(count: object, size: object) -> str:
    return f"chunk table of {count} entries does not fit the plane's {size} bytes"


def msg_chunk_sizes(total: object, size: object) -> str:
    return f"chunks add up to {total} bytes, the plane has {size}"


def msg_zstd_short(size: object) -> str:
    return f"a zstd chunk of {size} bytes is shorter than the smallest zstd frame ({ZSTD_MIN_FRAME} bytes)"


def msg_zstd_magic(at: object) -> str:
    return f"a zstd chunk at stored offset {at} does not start with zstd's magic number"


def msg_zstd_dictionary(at: object) -> str:
    return f"a zstd chunk at stored offset {at} needs a dictionary"


def msg_zstd_no_size(at: object) -> str:
    return f"a zstd chunk at stored offset {at} does not say its decoded size"


def msg_zstd_header_short(size: object) -> str:
    return f"a zstd chunk of {size} bytes is shorter than its own header"


def msg_zstd_size(at: object, promised: object, raw: object) -> str:
    return f"a zstd chunk at stored offset {at} decodes to {promised} bytes, {raw} planned"


def msg_zstd_not_one_frame(at: object, size: object) -> str:
    return (
        f"a zstd chunk at stored offset {at} is not one zstd frame of at most {ZSTD_MAX_BLOCKS} blocks "
        f"that ends with the chunk's {size} bytes"
    )


def msg_decoded_size(what: str, got: object, want: object) -> str:
    return f"{what} decodes to {got} bytes, expected {want}"


class FormatError(ValueError):
    """Stored bytes that break a rule of the format (the message says which, in this module's words)."""


# --------------------------------------------------------------------------- the rules, one frame at a time
def plane_table(stored: bytes | memoryview, element_size: int, raw_size: int) -> list[tuple[int, int, int]]:
    """Parse a layout-2 frame's header: ``(mode, offset in the frame, stored size)`` per plane, checked against the
    frame's length and raw size (each plane holds ``raw_size / element_size`` bytes once decoded), so that no
    decoder is ever handed a range outside the frame. Raises FormatError."""
    es = element_size
    if es not in PLANE_WIDTHS:
        raise FormatError(msg_element_size(es))
    if raw_size % es:
        raise FormatError(msg_not_whole_elements(raw_size, es))
    head = plane_header_size(es)
    if len(stored) < head:
        raise FormatError(msg_plane_header_short(len(stored), head))
    table, pos, n = [], head, raw_size // es
    for k in range(es):
        mode, size = PLANE_ENTRY.unpack_from(stored, len(PLANES_TAG) + PLANE_ENTRY.size * k)
        if mode not in PLANE_MODES:
            raise FormatError(msg_unknown_mode(k, mode))
        if pos + size > len(stored):
            raise FormatError(msg_plane_overruns(k, size, max(0, len(stored) - pos)))
        if mode == PLANE_RAW and size != n:
            raise FormatError(msg_plane_size(k, size, n))
        table.append((mode, pos, size))
        pos += size
    if pos != len(stored):
        raise FormatError(msg_after_planes(len(stored) - pos))
    return table


def plane_chunks(data: bytes | memoryview, plane_bytes: int) -> list[tuple[int, int, int]]:
    """Parse a chunked plane's table (mode 2; ``data``: the plane's stored bytes): ``(offset in data, stored size,
    decoded size)`` per chunk, checked against the data's length and the plane's size. Raises FormatError."""
    if len(data) < CHUNK_TABLE_HEAD.size:
        raise FormatError(msg_chunk_table_short(len(data)))
    sub, count = CHUNK_TABLE_HEAD.unpack_from(data, 0)
    if sub < PLANE_CHUNK or count != -(-plane_bytes // sub):
        raise FormatError(msg_chunk_table(count, sub, plane_bytes))
    pos = CHUNK_TABLE_HEAD.size + CHUNK_ENTRY * count
    if pos > len(data):
        raise FormatError(msg_chunk_table_overflows(count, len(data)))
    out = []
    for k, size in enumerate(struct.unpack_from(f"<{count}I", data, CHUNK_TABLE_HEAD.size)):
        out.append((pos, size, min(sub, plane_bytes - k * sub)))
        pos += size
    if pos != len(data):
        raise FormatError(msg_chunk_sizes(pos, len(data)))
    return out


def check_zstd(data: bytes | memoryview, raw: int, *, at: int = 0, chunk: bool = True) -> None:
    """Check the zstd frame header at the start of ``data`` (a range of ``len(data)`` bytes that must decode to
    ``raw``): zstd's magic, no dictionary, room for a block, and a content size equal to ``raw``. ``chunk`` (a chunk
    of a chunked plane) also requires the content size and a frame of at most ZSTD_MAX_BLOCKS blocks whose headers
    lead exactly to the range's end: the host decodes a plane's chunks as one run of frames, the GPU chunk by chunk,
    and only such chunks read the same on both. Other ranges may leave the size out (older writers could) and are
    not walked. ``at`` names the range in messages. Raises FormatError.

    The C helper (_planes.c, check_chunk) and the GPU planner (_check_zstd_heads) check the same, in the same words.
    """
    size = len(data)
    if size < ZSTD_MIN_FRAME:
        raise FormatError(msg_zstd_short(size))
    if int.from_bytes(data[:4], "little") != ZSTD_MAGIC:
        raise FormatError(msg_zstd_magic(at))
    fhd = data[4]
    if fhd & 3:
        raise FormatError(msg_zstd_dictionary(at))
    width = zstd_fcs_width(fhd)
    if width == 0 and chunk:
        raise FormatError(msg_zstd_no_size(at))
    field = 6 - ((fhd >> 5) & 1)  # magic, descriptor, and a window byte unless single segment
    if field + width + ZSTD_BLOCK_HEADER > size:
        raise FormatError(msg_zstd_header_short(size))
    if width:
        promised = min(int.from_bytes(data[field : field + width], "little"), ZSTD_SIZE_CAP)
        promised += ZSTD_FCS2_BIAS if width == 2 else 0
        if promised != raw:
            raise FormatError(msg_zstd_size(at, promised, raw))
    if not chunk:
        return
    pos, last = field + width, False
    for _ in range(ZSTD_MAX_BLOCKS):
        if pos + ZSTD_BLOCK_HEADER > size:
            break
        header = int.from_bytes(data[pos : pos + ZSTD_BLOCK_HEADER], "little")
        kind, last = (header >> 1) & 3, bool(header & 1)
        if kind == 3:  # reserved block type
            last = False
            break
        pos += ZSTD_BLOCK_HEADER + (1 if kind == 1 else header >> 3)  # an RLE block stores one byte
        if last:
            break
    if last:
        pos += ZSTD_CHECKSUM if (fhd >> 2) & 1 else 0
    if not last or pos != size:
        raise FormatError(msg_zstd_not_one_frame(at, size))


def check_chunked_plane(data: bytes | memoryview, plane_bytes: int) -> int:
    """Check a chunked plane before it is decoded as one run of zstd frames: its table (plane_chunks) and every
    chunk (check_zstd, at its offset in ``data``). Returns the offset of the first chunk. Raises FormatError."""
    chunks = plane_chunks(data, plane_bytes)
    view = memoryview(data)
    for at, size, raw in chunks:
        check_zstd(view[at : at + size], raw, at=at)
    return chunks[0][0] if chunks else CHUNK_TABLE_HEAD.size


def check_frame(stored: bytes | memoryview, encoding: str, element_size: int, raw_size: int) -> None:
    """Check one stored frame's structure as every decoder does before decoding: sizes, plane and chunk tables, and
    the zstd header of every zstd range (chunks walked to their end). What decodes after this is zstd's business.
    Raises FormatError."""
    if encoding not in ENCODINGS:
        raise FormatError(f"unknown encoding {encoding!r}")
    if encoding == "none":
        if len(stored) != raw_size:
            raise FormatError(msg_stored_size(len(stored), raw_size))
        return
    es = element_size if encoding == "zstd-byteplane" else 1
    if es > 1 and raw_size % es:
        raise FormatError(msg_not_whole_elements(raw_size, es))
    if es == 1 or bytes(stored[: len(PLANES_TAG)]) != PLANES_TAG:
        check_zstd(stored, raw_size, chunk=False)
        return
    view = memoryview(stored)
    for mode, at, size in plane_table(view, es, raw_size):
        if mode == PLANE_ZSTD:
            check_zstd(view[at : at + size], raw_size // es, at=at, chunk=False)
        elif mode == PLANE_ZSTD_CHUNKS:
            check_chunked_plane(view[at : at + size], raw_size // es)
