"""Load pipeline (issue 5, target 3 and the memory rule): WeightReader to host tensors, read + verified + decoded.

Compressed store (zstd-byteplane): WeightReader.read_all() on T threads vs plain zstandard decoding of the same
tensors cut into the same 4 MiB frames, compressed with zstd-3, on the same T threads (target <= 1.25x).
Uncompressed store ("none"): read_all() vs one plain read() of the same file from the page cache into new memory (target
>= 0.7x of its speed). Memory: the resident set's growth at its peak during read_all() against the model's raw size (one copy is the
result itself; two would be the failure).

    python bench/bench_load.py [--model minilm] [--dtype fp32] [--copies 1] [--threads 1,2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data
import zstandard

from bundler.store_writer import DEFAULT_CHUNK, write_weight_store
from runtime_shim.store.reader import WeightReader

_local = threading.local()


def _zstd_job(stored: bytes) -> None:
    dctx = getattr(_local, "d", None)
    if dctx is None:
        dctx = _local.d = zstandard.ZstdDecompressor()
    dctx.decompress(stored)


def rss_peak_during(fn) -> tuple[int, int]:
    """(resident bytes before, peak resident bytes while fn runs), sampling /proc/self/statm every millisecond.

    RSS, not tracemalloc: it counts every allocation, numpy, zstandard and mmap alike."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        result = fn()
        peak[0] = max(peak[0], rss())
    finally:
        done.set()
        t.join()
    del result
    return base, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--copies", type=int, default=1)
    cores = os.cpu_count() or 1
    ap.add_argument("--threads", default=_data.thread_counts())
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    weights = _data.model(args.model, args.dtype, args.copies)
    raws = [_data.raw_bytes(w) for w in weights]

    with tempfile.TemporaryDirectory(dir=os.environ.get("TRTX_BENCH_TMP")) as tmp:
        stores = {
            enc: write_weight_store(weights, Path(tmp) / enc, encoding=enc, threads=cores)
            for enc in ("zstd-byteplane", "none")
        }
        raw = sum(b.nbytes for b in stores["none"].blobs)
        # Baseline frames: every blob's raw bytes cut like the store's, each a plain zstd-3 frame.
        z3c = zstandard.ZstdCompressor(level=3)
        firsts = {}
        for w, r in zip(weights, raws):
            firsts.setdefault(stores["none"].blobs[stores["none"].tensor(w.name).blob].sha256, r)
        zframes = [
            z3c.compress(r[p : p + DEFAULT_CHUNK]) for r in firsts.values() for p in range(0, len(r), DEFAULT_CHUNK)
        ]
        none_path = Path(tmp) / "none" / stores["none"].file.path
        for enc, s in stores.items():
            (Path(tmp) / enc / s.file.path).read_bytes()  # page cache
        print(
            f"{cores} CPUs; {args.model}-{args.dtype} x{args.copies}: {raw / 1e6:.1f} MB raw; "
            f"store {stores['zstd-byteplane'].file.size / raw:.1%} of raw; medians of {args.repeat}"
        )
        print(
            f"{'T':>3s} {'zstd-3 only s':>14s} {'load s':>8s} {'load/zstd':>10s} {'(no sha)':>9s}   {'plain read s':>12s} {'none load s':>11s} {'read/load':>10s} {'(no sha)':>9s}"
        )
        for T in [int(t) for t in args.threads.split(",")]:
            with cf.ThreadPoolExecutor(T) as pool:
                t_z = _data.median_time(lambda: list(pool.map(_zstd_job, zframes)), args.repeat, collect=True)
            with WeightReader(Path(tmp) / "zstd-byteplane", stores["zstd-byteplane"], threads=T) as r:
                t_load = _data.median_time(r.read_all, args.repeat, collect=True)
            with WeightReader(
                Path(tmp) / "zstd-byteplane", stores["zstd-byteplane"], threads=T, verify_frames=False
            ) as r:
                t_load_ns = _data.median_time(r.read_all, args.repeat, collect=True)

            def plain_read() -> None:  # into fresh memory, as a load must: Path.read_bytes()
                with open(none_path, "rb", buffering=0) as f:
                    f.read()

            t_read = _data.median_time(plain_read, args.repeat, collect=True)
            with WeightReader(Path(tmp) / "none", stores["none"], threads=T) as r:
                t_none = _data.median_time(r.read_all, args.repeat, collect=True)
            with WeightReader(Path(tmp) / "none", stores["none"], threads=T, verify_frames=False) as r:
                t_none_ns = _data.median_time(r.read_all, args.repeat, collect=True)
            print(
                f"{T:3d} {t_z:14.3f} {t_load:8.3f} {t_load / t_z:9.2f}x {t_load_ns / t_z:8.2f}x   "
                f"{t_read:12.3f} {t_none:11.3f} {t_read / t_none:9.2f}x {t_read / t_none_ns:8.2f}x"
            )
        print(
            "targets: load/zstd <= 1.25x; read/load >= 0.7x (verified: the default; '(no sha)': verify_frames=False, for comparison)"
        )

        for enc, s in stores.items():
            gc.collect()
            base, peak = rss_peak_during(
                lambda enc=enc, s=s: WeightReader(Path(tmp) / enc, s, threads=min(cores, 8)).read_all()
            )
            grown = peak - base
            print(
                f"memory, {enc}: resident set grew by {grown / 2**20:.1f} MiB at its peak during read_all = {grown / raw:.2f}x the model's "
                f"{raw / 2**20:.1f} MiB (sampled every ms; the result itself is 1.00x; target < 2x)"
            )


if __name__ == "__main__":
    main()
