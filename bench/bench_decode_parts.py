"""Where the host decoder stops scaling with threads (issue 5, target 2): each part of a frame's decode on its own.

Same frames as bench_decode.py. Per thread count, GB/s of raw output for: the whole decode (decode_frame_into);
the zstd run of each chunked plane alone; the C helper's join alone, from planes already decoded; a plain
``numpy.copyto`` of the same output from a per-thread buffer (GIL released: what the memory system allows); and
python-zstandard's ``multi_decompress_to_buffer`` of the same chunks (GIL released for the whole plane). Each
column's scaling is against its own one-thread speed: if the parts with no Python and no GIL stop where the
whole decoder stops, the machine is the limit, not the decoder's serial parts.

    python bench/bench_decode_parts.py [--dtype bf16] [--copies 4] [--threads 1,2,4,8,16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data
import numpy as np
import zstandard

from bundler.store_writer import DEFAULT_CHUNK, encode_frame
from runtime_shim.store import decode
from runtime_shim.store.decode import decode_chunks, decode_frame_into, join_rotated, scratch, thread_dctx
from runtime_shim.store.format import FLOAT_DTYPES, ITEMSIZE, PLANE_ZSTD_CHUNKS, PLANES_TAG, plane_chunks, plane_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--copies", type=int, default=4)
    cores = os.cpu_count() or 1
    ap.add_argument("--threads", default=_data.thread_counts())
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not decode.native_join():
        sys.exit("the C helper runtime_shim.store._planes is not built: this benchmark measures its parts")
    weights = _data.model(args.model, args.dtype, args.copies)
    frames = []  # (stored, element size, out, [(mode, plane bytes)])
    for w in weights:
        if w.dtype not in FLOAT_DTYPES:
            continue
        raw, es = _data.raw_bytes(w), ITEMSIZE[w.dtype]
        step = DEFAULT_CHUNK - DEFAULT_CHUNK % es
        for p in range(0, len(raw), step):
            piece = raw[p : p + step]
            stored = memoryview(encode_frame(piece, "zstd-byteplane", es, 3))
            planes = (
                [(mode, stored[at : at + size]) for mode, at, size in plane_table(stored, es, len(piece))]
                if bytes(stored[:4]) == PLANES_TAG
                else []
            )
            frames.append((stored, es, memoryview(bytearray(len(piece))), planes))
    total = sum(len(f[2]) for f in frames)

    def whole(f) -> None:
        decode_frame_into(f[0], "zstd-byteplane", f[1], f[2])

    def zstd_run(f) -> None:
        n = len(f[2]) // f[1]
        for mode, data in f[3]:
            if mode == PLANE_ZSTD_CHUNKS:
                decode_chunks(data, n, scratch("bench", n))

    def join(f) -> None:
        n = len(f[2]) // f[1]
        if f[3]:
            join_rotated(f[2], [np.frombuffer(scratch(f"bench{k}", n), np.uint8) for k in range(f[1])])

    def copy(f) -> None:
        out = np.frombuffer(f[2], np.uint8)
        np.copyto(out, np.frombuffer(scratch("bench-copy", len(out)), np.uint8))

    def multi(f) -> None:
        n = len(f[2]) // f[1]
        for mode, data in f[3]:
            if mode == PLANE_ZSTD_CHUNKS:
                ch = np.array(plane_chunks(data, n), dtype=np.uint64)
                thread_dctx().multi_decompress_to_buffer(
                    zstandard.BufferWithSegments(data, ch[:, :2].tobytes()),
                    decompressed_sizes=ch[:, 2].tobytes(),
                    threads=1,
                )

    parts = [
        ("decode", whole),
        ("zstd run", zstd_run),
        ("C join", join),
        ("np.copyto", copy),
        ("multi_decompress", multi),
    ]
    print(
        f"{cores} CPUs; {args.model}-{args.dtype} x{args.copies}: {total / 1e6:.1f} MB raw in {len(frames)} frames; "
        f"GB/s of raw output (scaling vs 1 thread); medians of {args.repeat}"
    )
    print(f"{'T':>3s} " + " ".join(f"{name:>20s}" for name, _ in parts))
    first: dict[str, float] = {}
    for T in [int(t) for t in args.threads.split(",")]:
        cells = []
        with cf.ThreadPoolExecutor(T) as pool:
            for name, fn in parts:
                list(pool.map(fn, frames))  # warm the per-thread buffers
                rate = total / _data.median_time(lambda fn=fn: list(pool.map(fn, frames)), args.repeat) / 1e9
                first.setdefault(name, rate)
                cells.append(f"{rate:8.2f} ({rate / first[name]:5.2f}x)")
        print(f"{T:3d} " + " ".join(f"{c:>20s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
