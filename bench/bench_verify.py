"""Frame digests (issue 13): hashlib sha256 vs BLAKE3 on the same stored frames and threads, alone and inside a load.

(a) hashing: every stored frame of the store hashed on T threads (a pool mapping over the frames, as the reader's
    threads do), sha256 vs BLAKE3, in GB/s of bytes hashed;
(b) the compressed store (zstd-byteplane): ``WeightReader.read_all()`` with frames pinned by sha256, by BLAKE3, and
    unverified (``verify_frames=False``), same run: verified/unverified = unverified time / verified time
    (target >= 0.8x at 1, 4 and 16 threads);
(c) the same for the uncompressed store ("none"), where hashing is most of the work besides the read.
The stores of one encoding hold the same frames byte for byte: only their index's digests differ. The variants are
timed in interleaved rounds (medians of --repeat), so a busy shared machine slows them alike.

    python bench/bench_verify.py [--model minilm] [--dtype fp32] [--copies 1] [--threads 1,4,16] [--repeat 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data

from bundler.store_writer import write_weight_store
from runtime_shim.manifest import WeightStore
from runtime_shim.store.digest import FRAME_DIGESTS, digest_function
from runtime_shim.store.reader import WeightReader

ENCODINGS = ("zstd-byteplane", "none")


def stored_frames(folder: Path, store: WeightStore) -> list[bytes]:
    """Every frame of the store as stored, each its own object (what a reader's thread hashes)."""
    data = (folder / store.file.path).read_bytes()
    return [data[f.offset : f.offset + f.size] for b in store.blobs for f in b.frames]


Timing = tuple[float, float]  # (median wall seconds, median CPU seconds of the whole process: every thread's)


def interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, Timing]:
    """Median wall and CPU seconds of each function, timed in rounds that call each once (in turn, the first one
    rotating), so that a machine shared with other jobs slows every variant alike rather than whichever ran while it
    was busy. CPU seconds count the work done whatever else runs: the ratio a busy machine distorts least."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            c0, t0 = _cpu(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def _cpu() -> float:
    return time.process_time()  # every thread of the process, user + system, at the clock's full resolution


def hash_seconds(frames: list[bytes], threads: int, repeat: int) -> dict[str, Timing]:
    """Seconds to hash every frame on ``threads`` threads, by digest."""
    with cf.ThreadPoolExecutor(threads) as pool:
        hashers = {d: digest_function(d) for d in FRAME_DIGESTS}
        return interleaved({d: functools.partial(_hash_all, pool, fn, frames) for d, fn in hashers.items()}, repeat)


def _hash_all(pool: cf.ThreadPoolExecutor, fn: Callable[[bytes], str], frames: list[bytes]) -> None:
    list(pool.map(fn, frames))


def load_seconds(stores: dict[str, tuple[Path, WeightStore]], threads: int, repeat: int) -> dict[str, Timing]:
    """Seconds of read_all() on ``threads`` threads: "unverified" (verify_frames=False) and verified by each digest."""
    readers = {"unverified": WeightReader(*stores["blake3"], threads=threads, verify_frames=False)}
    readers |= {d: WeightReader(*stores[d], threads=threads) for d in FRAME_DIGESTS}
    try:
        for r in readers.values():
            r.read_all()  # warm-up: the threads' scratch buffers, malloc's arenas
        return interleaved({k: r.read_all for k, r in readers.items()}, repeat)
    finally:
        for r in readers.values():
            r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--threads", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    threads = [int(t) for t in args.threads.split(",")]
    weights = _data.model(args.model, args.dtype, args.copies)

    with tempfile.TemporaryDirectory(dir=os.environ.get("TRTX_BENCH_TMP")) as tmp:
        stores: dict[tuple[str, str], tuple[Path, WeightStore]] = {}
        for enc in ENCODINGS:
            for digest in FRAME_DIGESTS:
                folder = Path(tmp) / f"{enc}-{digest}"
                store = write_weight_store(weights, folder, encoding=enc, threads=cores, frame_digest=digest)
                (folder / store.file.path).read_bytes()  # into the page cache
                stores[enc, digest] = folder, store
        for enc in ENCODINGS:  # the frames are the same bytes whatever pins them
            a, b = (stores[enc, d] for d in FRAME_DIGESTS)
            assert a[1].file == b[1].file, f"{enc}: the two stores differ"
        raw = sum(b.nbytes for b in stores["none", "sha256"][1].blobs)
        frames = {enc: stored_frames(*stores[enc, "sha256"]) for enc in ENCODINGS}
        print(
            f"{cores} CPUs; {args.model}-{args.dtype} x{args.copies}: {raw / 1e6:.1f} MB raw, "
            + "; ".join(
                f"{enc} store {sum(map(len, fr)) / 1e6:.1f} MB in {len(fr)} frames" for enc, fr in frames.items()
            )
            + f"; medians of {args.repeat}"
            + (
                ""
                if max(threads) <= cores
                else f"; more threads than CPUs from T={min(t for t in threads if t > cores)}"
            )
        )

        print(
            "\n(a) hashing the stored frames: GB/s of bytes hashed (wall clock), and GB per CPU second (one core's speed)"
        )
        print(
            f"{'store':16s} {'T':>3s} {'sha256':>8s} {'BLAKE3':>8s} {'BLAKE3/sha256':>14s}   "
            f"{'sha256/CPU-s':>12s} {'BLAKE3/CPU-s':>12s}"
        )
        for enc in ENCODINGS:
            size = sum(map(len, frames[enc]))
            for T in threads:
                (w_sha, c_sha), (w_b3, c_b3) = (
                    hash_seconds(frames[enc], T, args.repeat)[d] for d in FRAME_DIGESTS[::-1]
                )
                print(
                    f"{enc:16s} {T:3d} {size / w_sha / 1e9:8.2f} {size / w_b3 / 1e9:8.2f} {w_sha / w_b3:13.2f}x   "
                    f"{size / c_sha / 1e9:12.2f} {size / c_b3 / 1e9:12.2f}"
                )

        for part, enc in (("(b)", "zstd-byteplane"), ("(c)", "none")):
            print(
                f"\n{part} read_all(), {enc} store: wall seconds, GB/s of raw bytes, and verified/unverified = unverified"
                " s / verified s, by wall clock (the target) and by CPU seconds"
            )
            print(
                f"{'T':>3s} {'unverified s':>12s} {'sha256 s':>9s} {'BLAKE3 s':>9s} {'GB/s unv/sha/b3':>18s} "
                f"{'sha256/unv':>11s} {'BLAKE3/unv':>11s}   {'CPU: sha256':>11s} {'BLAKE3':>7s}"
            )
            for T in threads:
                t = load_seconds({d: stores[enc, d] for d in FRAME_DIGESTS}, T, args.repeat)
                (t_unv, c_unv), (t_sha, c_sha), (t_b3, c_b3) = t["unverified"], t["sha256"], t["blake3"]
                speeds = "/".join(f"{raw / w / 1e9:.2f}" for w in (t_unv, t_sha, t_b3))
                print(
                    f"{T:3d} {t_unv:12.3f} {t_sha:9.3f} {t_b3:9.3f} {speeds:>18s} "
                    f"{t_unv / t_sha:10.2f}x {t_unv / t_b3:10.2f}x   {c_unv / c_sha:10.2f}x {c_unv / c_b3:6.2f}x"
                )
        print("\ntarget: verified/unverified >= 0.8x at every T (unverified = verify_frames=False, same frames)")


if __name__ == "__main__":
    main()
