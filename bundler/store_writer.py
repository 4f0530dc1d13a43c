"""Writes the weight store: dedupes tensors into blobs, splits them into independent zstd frames, content-addresses the file.

Format: docs/WEIGHT_STORE.md. Output is deterministic: the same tensors, encoding, level and chunk size give the
same bytes whatever the thread count (frames are compressed independently, each by its own compressor, and
written in index order).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import logging
import os
import struct
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from runtime_shim.errors import ModelError
from runtime_shim.fsutil import atomic_writer, sha256_bytes
from runtime_shim.manifest import (
    DTYPES,
    WEIGHT_ENCODINGS,
    Blob,
    FileRef,
    Frame,
    StoreIndex,
    WeightStore,
    WeightTensor,
)
from runtime_shim.store.digest import DEFAULT_FRAME_DIGEST, Digest, digest_function
from runtime_shim.store.format import (
    CHUNK_TABLE_HEAD,
    FLOAT_DTYPES,
    ITEMSIZE,
    MAGIC,
    PLANE_CHUNK,
    PLANE_ENTRY,
    PLANE_RAW,
    PLANE_WIDTHS,
    PLANE_ZSTD_CHUNKS,
    PLANES_TAG,
    UINT_DTYPES,
    nbytes_for,
)

log = logging.getLogger(__name__)

DEFAULT_LEVEL = 3  # see docs/WEIGHT_STORE.md for the measurements behind it
DEFAULT_CHUNK = 4 << 20
ALIGNMENT = 64  # raw_offset alignment in the unpacked layout: cache lines, and what ONNX/ORT readers seek to
MIN_SAVING = (
    0.02  # a blob whose frames save less than this fraction is stored as "none": decoding it would cost for nothing
)

Buffer = bytes | bytearray | memoryview | np.ndarray
Progress = Callable[[int, int], None]  # (raw bytes done, raw bytes in all)


@dataclass(frozen=True)
class Weight:
    """One tensor to store: its ONNX initializer name, manifest dtype name, shape, and raw little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Buffer


# --------------------------------------------------------------------------- one frame
PLANE_RAW_ABOVE = 0.98  # a plane that zstd shrinks by less than 2% is stored raw: decoding it is then a copy
# For the exponent plane: zstd with (almost) no match finding, i.e. Huffman-coded literals. Short matches in a
# low-entropy byte stream cost more than they save (MiniLM fp32 exponents: 33.0% of raw vs 41.1% at level 3),
# and this encodes at several hundred MB/s. Each plane gets the smaller of this and the level's output.
LITERALS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST,
    window_log=17,
    hash_log=6,
    chain_log=6,
    search_log=1,
    min_match=7,
    target_length=0,
    write_content_size=True,
    write_checksum=False,
)
_local = threading.local()


def _cctx(level: int | None) -> zstandard.ZstdCompressor:
    """A per-thread compressor (None: the literals-only one); contexts are not thread-safe and costly to make."""
    cache = _local.__dict__.setdefault("cctx", {})
    if level not in cache:
        cache[level] = (
            zstandard.ZstdCompressor(compression_params=LITERALS)
            if level is None
            else zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        )
    return cache[level]


def encode_frame(raw: bytes | memoryview, encoding: str, element_size: int, level: int) -> bytes:
    """Encode one frame's raw bytes; the inverse is runtime_shim.store.decode.decode_frame_into."""
    if encoding == "none":
        return bytes(raw)
    if encoding not in ("zstd", "zstd-byteplane"):
        raise ValueError(f"unknown encoding {encoding!r}")
    if encoding == "zstd" or element_size == 1:
        return _cctx(level).compress(raw)
    if element_size not in PLANE_WIDTHS or len(raw) % element_size:
        raise ValueError(f"zstd-byteplane: {len(raw)} bytes is not a whole number of {element_size}-byte elements")
    # Layout 2 (docs/WEIGHT_STORE.md): rotate each element left by one bit, so the sign moves to bit 0 and the top
    # byte of a float32/bfloat16 is its exponent alone; then byte k of every element forms plane k, stored raw
    # or as its own zstd frame, whichever is smaller (raw unless zstd saves 2%: mantissa planes are noise).
    u = np.dtype(UINT_DTYPES[element_size])
    x = np.frombuffer(raw, dtype=u)
    rotated = (x << u.type(1)) | (x >> u.type(8 * element_size - 1))
    elements = rotated.view(np.uint8).reshape(-1, element_size)
    header: list[bytes] = [PLANES_TAG]
    parts: list[bytes | memoryview] = []
    for k in range(element_size):
        plane = np.ascontiguousarray(elements[:, k]).data
        best = min((_chunked(plane, None), _chunked(plane, level)), key=len)
        if len(best) > PLANE_RAW_ABOVE * len(plane):
            header.append(PLANE_ENTRY.pack(PLANE_RAW, len(plane)))
            parts.append(plane)
        else:
            header.append(PLANE_ENTRY.pack(PLANE_ZSTD_CHUNKS, len(best)))
            parts.append(best)
    return b"".join([*header, *parts])


def _chunked(plane: memoryview, level: int | None) -> bytes:
    """A plane as independent zstd frames of PLANE_CHUNK bytes each, after their size table (plane mode 2).

    64 KiB chunks cost 0.02% of an exponent plane against one frame (each chunk carries its own Huffman table; the
    zstd blocks of one frame already did every 128 KiB) and let a GPU decode ~30x more chunks at once.
    """
    cctx = _cctx(level)
    frames = [cctx.compress(plane[i : i + PLANE_CHUNK]) for i in range(0, len(plane), PLANE_CHUNK)]
    table = CHUNK_TABLE_HEAD.pack(PLANE_CHUNK, len(frames)) + struct.pack(f"<{len(frames)}I", *map(len, frames))
    return b"".join([table, *frames])


def _encode_and_hash(
    raw: memoryview, encoding: str, element_size: int, level: int, digest: Digest
) -> tuple[bytes, str]:
    stored = encode_frame(raw, encoding, element_size, level)
    return stored, digest(stored)


def as_bytes(data: Buffer) -> memoryview:
    """A weight's data as little-endian bytes, without a copy where it already is."""
    if isinstance(data, np.ndarray):
        arr = data
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
    return memoryview(data).cast("B")


def _check(w: Weight, i: int, raw: memoryview) -> None:
    where = f"weight {i} ({w.name!r})"
    if w.dtype not in DTYPES:
        raise ModelError(f"{where}: dtype {w.dtype!r} cannot be stored; expected one of {', '.join(DTYPES)}")
    expected = nbytes_for(w.dtype, w.shape)
    if len(raw) != expected:
        raise ModelError(f"{where}: {len(raw)} bytes, expected {expected} for {w.dtype} {list(w.shape)}")


@dataclass
class _Plan:
    blob_of: list[int]  # per input tensor
    firsts: list[int]  # per blob: the input tensor whose bytes it holds
    shas: list[str]
    offsets: list[int]  # raw_offset per blob


def _plan(weights: Sequence[Weight], raws: Sequence[memoryview], shas: Sequence[str], alignment: int) -> _Plan:
    seen: dict[tuple[str, str], int] = {}
    plan = _Plan([], [], [], [])
    pos = 0
    for i, (w, raw, sha) in enumerate(zip(weights, raws, shas)):
        key = (w.dtype, sha)  # same bytes but another dtype stays separate: the byte-plane width differs
        if key not in seen:
            seen[key] = len(plan.firsts)
            pos = -(-pos // alignment) * alignment
            plan.firsts.append(i)
            plan.shas.append(sha)
            plan.offsets.append(pos)
            pos += len(raw)
        plan.blob_of.append(seen[key])
    return plan


def write_weight_store(
    tensors: Iterable[Weight | tuple],
    bundle_dir: str | os.PathLike[str],
    *,
    encoding: str = "zstd-byteplane",
    level: int = DEFAULT_LEVEL,
    chunk_bytes: int = DEFAULT_CHUNK,
    threads: int | None = None,
    progress: Progress | None = None,
    alignment: int = ALIGNMENT,
    frame_digest: str = DEFAULT_FRAME_DIGEST,
) -> WeightStore:
    """Write ``bundle_dir/weights/<sha256>.trtxw`` atomically for one model and return its index for the manifest.

    ``tensors`` are Weight (or (name, dtype, shape, data) tuples) in the order the manifest lists them.
    ``encoding`` "zstd-byteplane" applies the split to floating dtypes only and plain zstd to the rest.
    """
    index, (model_tensors,) = write_shared_store(
        [tensors],
        bundle_dir,
        encoding=encoding,
        level=level,
        chunk_bytes=chunk_bytes,
        threads=threads,
        progress=progress,
        alignment=alignment,
        frame_digest=frame_digest,
    )
    return index.with_tensors(model_tensors)


def write_shared_store(
    models: Sequence[Iterable[Weight | tuple]],
    bundle_dir: str | os.PathLike[str],
    *,
    encoding: str = "zstd-byteplane",
    level: int = DEFAULT_LEVEL,
    chunk_bytes: int = DEFAULT_CHUNK,
    threads: int | None = None,
    progress: Progress | None = None,
    alignment: int = ALIGNMENT,
    frame_digest: str = DEFAULT_FRAME_DIGEST,
) -> tuple[StoreIndex, list[tuple[WeightTensor, ...]]]:
    """One weight store for several models: a tensor whose bytes and dtype another tensor (of any model) has is
    stored once. Returns the shared index and each model's tensors, in the order given."""
    if encoding not in WEIGHT_ENCODINGS:
        raise ValueError(f"encoding {encoding!r}: expected one of {', '.join(WEIGHT_ENCODINGS)}")
    if chunk_bytes < 8:
        raise ValueError(f"chunk_bytes {chunk_bytes}: expected at least 8")
    groups = [
        [t if isinstance(t, Weight) else Weight(t[0], t[1], tuple(int(d) for d in t[2]), t[3]) for t in tensors]
        for tensors in models
    ]
    for group in groups:  # names are per model: two models may each have their own "fc.weight"
        names = collections.Counter(w.name for w in group)
        if dupes := sorted(n for n, c in names.items() if c > 1):
            raise ModelError(f"weight names must be unique; repeated: {', '.join(map(repr, dupes[:5]))}")
    weights = [w for group in groups for w in group]
    raws = [as_bytes(w.data) for w in weights]
    for i, (w, raw) in enumerate(zip(weights, raws)):
        _check(w, i, raw)
    threads = max(1, threads if threads is not None else min(8, os.cpu_count() or 1))
    with cf.ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL: hash tensors in parallel
        shas = list(pool.map(sha256_bytes, raws))
    plan = _plan(weights, raws, shas, alignment)
    total = sum(len(raws[i]) for i in plan.firsts)
    digest = digest_function(frame_digest)

    folder = Path(bundle_dir) / "weights"
    folder.mkdir(parents=True, exist_ok=True)
    # The name is the content's sha256, known only at the end: write a unique staging file atomically, then rename.
    staging = folder / f".staging-{uuid.uuid4().hex}.trtxw"
    blobs: list[Blob] = []
    file_hash = hashlib.sha256(MAGIC)
    try:
        with atomic_writer(staging) as f, cf.ThreadPoolExecutor(threads) as pool:
            f.write(MAGIC)
            offset, done = len(MAGIC), 0
            for b, (stored_frames, blob_encoding, element_size) in enumerate(
                _encode_blobs(plan, weights, raws, encoding, level, chunk_bytes, pool, 4 * threads, digest)
            ):
                frames = []
                for raw_size, stored, stored_digest in stored_frames:
                    f.write(stored)
                    file_hash.update(stored)
                    frames.append(Frame(offset=offset, size=len(stored), raw_size=raw_size, digest=stored_digest))
                    offset += len(stored)
                raw = raws[plan.firsts[b]]
                blobs.append(
                    Blob(
                        sha256=plan.shas[b],
                        nbytes=len(raw),
                        raw_offset=plan.offsets[b],
                        encoding=blob_encoding,
                        element_size=element_size,
                        frames=tuple(frames),
                    )
                )
                done += len(raw)
                if progress is not None:
                    progress(done, total)
        sha = file_hash.hexdigest()
        ref = FileRef.for_content("weights", sha, offset)
        os.replace(staging, Path(bundle_dir) / ref.path)
    finally:
        if staging.exists():
            staging.unlink()
    raw_size = max((b.raw_offset + b.nbytes for b in blobs), default=0)
    index = StoreIndex(file=ref, raw_size=raw_size, alignment=alignment, frame_digest=frame_digest, blobs=tuple(blobs))
    per_model, start = [], 0
    for group in groups:
        per_model.append(
            tuple(
                WeightTensor(name=w.name, dtype=w.dtype, shape=tuple(w.shape), blob=plan.blob_of[start + k])
                for k, w in enumerate(group)
            )
        )
        start += len(group)
    log.info(
        "weight store %s: %d tensors of %d model(s) in %d blobs, %d raw bytes -> %d stored (%s, frames by %s)",
        ref.path,
        len(weights),
        len(groups),
        len(blobs),
        total,
        ref.size,
        encoding,
        frame_digest,
    )
    return index, per_model


def _encode_blobs(
    plan: _Plan,
    weights: Sequence[Weight],
    raws: Sequence[memoryview],
    encoding: str,
    level: int,
    chunk_bytes: int,
    pool: cf.Executor,
    window: int,
    digest: Digest,
) -> Iterable[tuple[list[tuple[int, bytes, str]], str, int]]:
    """Per blob, in order: its stored frames [(raw_size, stored bytes, their digest)], the encoding chosen, the element size.

    Frames are submitted ahead across blob boundaries with a bounded window, so small blobs keep every thread busy
    while memory stays bounded by the window (plus one blob's frames).
    """
    jobs: collections.deque = collections.deque()

    def blob_params(b: int) -> tuple[str, int, list[memoryview]]:
        w, raw = weights[plan.firsts[b]], raws[plan.firsts[b]]
        enc = encoding
        if enc == "zstd-byteplane" and w.dtype not in FLOAT_DTYPES:
            enc = "zstd"
        element_size = ITEMSIZE[w.dtype] if enc == "zstd-byteplane" else 1
        chunk = max(element_size, chunk_bytes - chunk_bytes % element_size)
        return enc, element_size, [raw[p : p + chunk] for p in range(0, len(raw), chunk)]

    blobs = iter(range(len(plan.firsts)))
    queued = 0

    def fill() -> None:
        nonlocal queued
        while queued < window and (b := next(blobs, None)) is not None:
            enc, element_size, pieces = blob_params(b)
            futs = [pool.submit(_encode_and_hash, piece, enc, element_size, level, digest) for piece in pieces]
            jobs.append((enc, element_size, pieces, futs))
            queued += len(futs)

    for _ in range(len(plan.firsts)):
        fill()
        enc, element_size, pieces, futs = jobs.popleft()
        queued -= len(futs)
        stored = [fut.result() for fut in futs]
        nbytes = sum(len(p) for p in pieces)
        if enc != "none" and (nbytes == 0 or sum(len(s) for s, _ in stored) > nbytes * (1 - MIN_SAVING)):
            enc, element_size, stored = "none", 1, [(bytes(p), digest(p)) for p in pieces]
        yield [(len(p), s, sha) for p, (s, sha) in zip(pieces, stored)], enc, element_size
