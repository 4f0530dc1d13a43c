"""Host-side limits of the upload pipeline, same run: what a GPU-decoding pipeline can at best feed the GPU.

Per thread count T, on a file in the page cache (the store's stored bytes): reading into pinned memory with preadv
(the pipeline's read), sha256 of pinned bytes (its verification), both together, and, where importable, BLAKE3 and
xxh3-128 as cheaper hashes. Then the other way to skip the host copy: mmap the file and register the mapping with
cudaHostRegister(ReadOnly), timing the registration (whole, in pieces on T threads, and pipelined with the copies)
and the DMA straight from the page cache. Baseline: pinned cudaMemcpy, as in bench_upload.py.

    python bench/bench_host_io.py [--mib 1024] [--threads 1,4,8,16]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import hashlib
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data

CHUNK = 4 << 20


def _parallel(T: int, n: int, job) -> float:
    """Seconds for job(k) over k in range(n) on T threads (median of 3)."""

    def once() -> None:
        with cf.ThreadPoolExecutor(T) as pool:
            list(pool.map(job, range(n)))

    return _data.median_time(once, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--threads", default="1,4,8,16")
    args = ap.parse_args()
    rt = _data.cuda_runtime("bench_host_io")
    if rt is None:
        return
    from bench_upload import pinned_memcpy_seconds

    from runtime_shim.errors import MachineError
    from runtime_shim.gpu.cuda import check as _check

    size = args.mib << 20
    n = size // CHUNK
    hashes = {"sha256": lambda b: hashlib.sha256(b).digest()}
    try:
        import blake3

        hashes["blake3"] = lambda b: blake3.blake3(b).digest()
    except ImportError:
        print("blake3 not importable: its rows are skipped")
    try:
        import xxhash

        hashes["xxh3-128"] = lambda b: xxhash.xxh3_128_digest(b)
    except ImportError:
        print("xxhash not importable: its rows are skipped")

    with tempfile.TemporaryDirectory(dir=os.environ.get("TRTX_BENCH_TMP")) as tmp:
        path = Path(tmp) / "data"
        with open(path, "wb") as f:
            for _ in range(n):
                f.write(os.urandom(CHUNK))
        path.read_bytes()  # into the page cache
        t_copy = pinned_memcpy_seconds(rt, size, 5)
        print(f"{os.cpu_count()} CPUs; {args.mib} MiB; baseline pinned cudaMemcpy {size / t_copy / 1e9:.2f} GB/s\n")
        host = _check(rt, rt.cudaMallocHost(size), "cudaMallocHost")
        fd = os.open(path, os.O_RDONLY)
        try:
            ctypes.memset(host, 0, size)
            views = [memoryview((ctypes.c_ubyte * CHUNK).from_address(host + k * CHUNK)).cast("B") for k in range(n)]

            def read(k: int) -> None:
                os.preadv(fd, [views[k]], k * CHUNK)

            print(
                f"{'T':>3s} {'preadv->pinned':>15s} "
                + " ".join(f"{h:>10s}" for h in hashes)
                + f" {'read+sha256':>12s}   GB/s (x of memcpy)"
            )
            for T in [int(x) for x in args.threads.split(",")]:
                cells = [size / _parallel(T, n, read)]
                for h in hashes.values():
                    cells.append(size / _parallel(T, n, lambda k, h=h: h(views[k])))
                cells.append(size / _parallel(T, n, lambda k: (read(k), hashes["sha256"](views[k]))))
                print(f"{T:3d} " + " ".join(f"{c / 1e9:6.2f} ({c * t_copy / size:4.2f}x)" for c in cells), flush=True)
        finally:
            os.close(fd)
            rt.cudaFreeHost(host)

        # Register the page cache itself: the DMA then reads the file's pages, no CPU copy at all.
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        import numpy as np

        addr = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][
            0
        ]  # read-only: ctypes.from_buffer refuses it
        flags = rt.cudaHostRegisterReadOnly if hasattr(rt, "cudaHostRegisterReadOnly") else 8
        t0 = time.perf_counter()
        try:
            _check(rt, rt.cudaHostRegister(addr, size, int(flags)), "cudaHostRegister(ReadOnly) of the mmap'd file")
            registered = True
        except MachineError as e:
            print(f"\n{e}")
            registered = False
        t_reg = time.perf_counter() - t0
        if registered:
            rt.cudaHostUnregister(addr)
            # the same, cut in 16 MiB ranges registered by T threads at once (does the pinning scale?)
            piece = 16 << 20
            for T in [int(x) for x in args.threads.split(",")]:
                with open(path, "rb") as f:  # a fresh mapping, as a new process would have
                    fresh = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
                at = np.frombuffer(fresh, dtype=np.uint8).__array_interface__["data"][0]

                def reg(k: int, at: int = at) -> None:
                    _check(rt, rt.cudaHostRegister(at + k * piece, piece, int(flags)), "cudaHostRegister")

                def unreg(k: int, at: int = at) -> None:
                    rt.cudaHostUnregister(at + k * piece)

                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(T) as pool:
                    list(pool.map(reg, range(size // piece)))
                t_par = time.perf_counter() - t0
                with cf.ThreadPoolExecutor(T) as pool:
                    list(pool.map(unreg, range(size // piece)))
                print(
                    f"  register in 16 MiB pieces on {T:2d} threads: {size / t_par / 1e9:6.2f} GB/s ({t_copy * size / t_par / size:.2f}x of memcpy)"
                )
            dev = _check(rt, rt.cudaMalloc(size), "cudaMalloc")
            h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            # Pipelined as an upload would: register a piece, copy it asynchronously, register the next...
            with open(path, "rb") as f:
                fresh = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
            at = np.frombuffer(fresh, dtype=np.uint8).__array_interface__["data"][0]
            stream = _check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
            t0 = time.perf_counter()
            for k in range(size // piece):
                _check(rt, rt.cudaHostRegister(at + k * piece, piece, int(flags)), "cudaHostRegister")
                _check(rt, rt.cudaMemcpyAsync(dev + k * piece, at + k * piece, piece, h2d, stream), "cudaMemcpyAsync")
            _check(rt, rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            t_pipe = time.perf_counter() - t0
            for k in range(size // piece):
                rt.cudaHostUnregister(at + k * piece)
            rt.cudaStreamDestroy(stream)
            print(
                f"  register + async copy, piece after piece: {size / t_pipe / 1e9:6.2f} GB/s ({t_copy / t_pipe:.2f}x of memcpy)"
            )
            _check(rt, rt.cudaHostRegister(addr, size, int(flags)), "cudaHostRegister")
            t_dma = _data.median_time(lambda: _check(rt, rt.cudaMemcpy(dev, addr, size, h2d), "cudaMemcpy"), 3)
            print(
                f"\nmmap + cudaHostRegister(ReadOnly): register {size / t_reg / 1e9:.2f} GB/s ({t_reg * 1e3:.0f} ms); "
                f"DMA from the registered page cache {size / t_dma / 1e9:.2f} GB/s ({t_copy / t_dma:.2f}x); "
                f"both {size / (t_reg + t_dma) / 1e9:.2f} GB/s ({t_copy / (t_reg + t_dma):.2f}x)"
            )
            rt.cudaFree(dev)
            rt.cudaHostUnregister(addr)
        mm.close()


if __name__ == "__main__":
    main()
