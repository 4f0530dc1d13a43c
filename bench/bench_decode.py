"""Decode speed (issue 5, target 2): the store's frames vs plain zstd-3 frames of the same tensors, 1 to N threads.

Frames are in memory (no file, no hash: bench_load.py covers those). Single thread: store decode speed / zstd-3
decode speed (target >= 0.8x). Threads: speed(T) / speed(1) against 0.7 x T (target up to the core count). Then the
decoder without its C helper (what an install with no C compiler gets), which decodes byte-plane frames on at most
NUMPY_DECODE_THREADS threads at once: its scaling against one thread, next to the same decoder on every thread (the
limit off), so that the knee can be read off a machine (target: more threads never slower).

    python bench/bench_decode.py [--model minilm] [--dtype fp32,fp16,bf16] [--copies 1] [--threads 1,2,4,8,16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data
import zstandard

from bundler.store_writer import DEFAULT_CHUNK, encode_frame
from runtime_shim.store import decode
from runtime_shim.store.format import FLOAT_DTYPES, ITEMSIZE

_local = threading.local()


def _zstd_job(job) -> None:
    dctx = getattr(_local, "d", None)
    if dctx is None:
        dctx = _local.d = zstandard.ZstdDecompressor()  # one per thread: a context is not thread-safe
    stored, out = job
    out[:] = dctx.decompress(stored)


def _store_job(job) -> None:
    stored, es, out = job
    decode.decode_frame_into(stored, "zstd-byteplane", es, out)


def _timed(pool: cf.Executor, fn, jobs: list, repeat: int, *, native: bool, numpy_limit: int | None = None) -> float:
    """Median time of one pass over ``jobs``, with or without the C helper (and another limit of numpy decoders)."""
    was = decode.use_native(native)
    limit = decode.limit_numpy_decoders(numpy_limit) if numpy_limit else None
    try:
        list(pool.map(fn, jobs))  # warm the per-thread buffers
        return _data.median_time(lambda: list(pool.map(fn, jobs)), repeat)
    finally:
        decode.use_native(was)
        if limit is not None:
            decode.limit_numpy_decoders(limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dtype", default="fp32,fp16,bf16")
    ap.add_argument("--copies", type=int, default=1)
    cores = os.cpu_count() or 1
    ap.add_argument("--threads", default=_data.thread_counts())
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    sets = _data.models(args.model)
    built = decode.native_built()
    print(
        f"{cores} CPUs; {DEFAULT_CHUNK >> 20} MiB frames; medians of {args.repeat}; without the C helper, pools of "
        f"at most {decode.NUMPY_DECODE_THREADS} threads decode; "
        f"C helper {'built' if built else 'NOT built: store and numpy columns are the same decoder'}"
    )
    for short in args.dtype.split(","):
        weights = _data.scaled(sets[f"{args.model}-{short}"], args.copies)
        tensors = [(w, _data.raw_bytes(w)) for w in weights if w.dtype in FLOAT_DTYPES and len(_data.raw_bytes(w))]
        raw = sum(len(r) for _, r in tensors)
        z3c = zstandard.ZstdCompressor(level=3)
        zjobs, sjobs = [], []
        for w, r in tensors:
            es = ITEMSIZE[w.dtype]
            out = memoryview(bytearray(len(r)))
            step = DEFAULT_CHUNK - DEFAULT_CHUNK % es
            for p in range(0, len(r), step):
                piece = r[p : p + step]
                zjobs.append((z3c.compress(piece), out[p : p + step]))
                sjobs.append((encode_frame(piece, "zstd-byteplane", es, 3), es, out[p : p + step]))
        print(f"\n== {args.model}-{short} x{args.copies}: {raw / 1e6:.1f} MB raw in {len(sjobs)} frames")
        print(
            f"{'T':>3s} {'zstd-3 GB/s':>12s} {'store GB/s':>11s} {'store/zstd-3':>13s} {'store scaling':>14s} {'0.7*T':>6s}"
            f" {'numpy GB/s':>11s} {'numpy scaling':>14s} {'no limit':>15s}"
        )
        one = one_np = one_free = None
        fallback = []
        for T in threads:
            with cf.ThreadPoolExecutor(T) as pool:
                t_z = _timed(pool, _zstd_job, zjobs, args.repeat, native=True)
                t_s = _timed(pool, _store_job, sjobs, args.repeat, native=True)
                # the same decoder without its C helper, on every thread and no limit
                t_f = _timed(pool, _store_job, sjobs, args.repeat, native=False, numpy_limit=T)
            # ... and as shipped: as many workers as WeightReader and the uploader give it (decode_threads)
            was = decode.use_native(False)
            workers = decode.decode_threads(T)
            decode.use_native(was)
            with cf.ThreadPoolExecutor(workers) as pool:
                t_n = _timed(pool, _store_job, sjobs, args.repeat, native=False) if built else t_s
            one, one_np, one_free = one or t_s, one_np or t_n, one_free or t_f
            fallback.append((T, one_np / t_n, one_free / t_f))
            print(
                f"{T:3d} {raw / t_z / 1e9:12.2f} {raw / t_s / 1e9:11.2f} {t_z / t_s:12.2f}x {one / t_s:13.2f}x {0.7 * T:6.1f}"
                f" {raw / t_n / 1e9:11.2f} {one_np / t_n:13.2f}x {one_free / t_f:14.2f}x"
            )
        steady = all(b[1] >= 0.95 * a[1] for a, b in zip(fallback, fallback[1:]))
        print(
            "without the C helper, scaling vs 1 thread: "
            + ", ".join(f"T={T} {r:.2f}x" for T, r, _ in fallback)
            + "; no limit: "
            + ", ".join(f"T={T} {r:.2f}x" for T, _, r in fallback)
            + f"; more threads never slower (5% noise): {'yes' if steady else 'NO'}"
        )


if __name__ == "__main__":
    main()
