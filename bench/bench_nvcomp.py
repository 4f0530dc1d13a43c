"""nvCOMP's zstd decoder on real exponent planes: time of one call against the chunk size and the chunk count.

Why the store's planes are 64 KiB chunks and why the GPU path's last batch cannot be hidden: the exponent plane of
MiniLM (bf16, --copies replicas) is compressed the way the store does it (literals-only zstd) in chunks of each
size, copied to the GPU once, and decoded by runtime_shim.gpu.nvcomp.Nvcomp with 100, a quarter of, and all the
chunks in one call (CUDA-event time, best of 3). Also printed: the plane's stored size per chunk size.

    python bench/bench_nvcomp.py [--copies 8] [--chunks-kib 64,32,16,2048]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data
import numpy as np
import zstandard

from bundler import store_writer
from runtime_shim.errors import MachineError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--chunks-kib", default="64,32,16,2048")
    args = ap.parse_args()
    rt = _data.cuda_runtime("bench_nvcomp")
    if rt is None:
        return
    from runtime_shim.gpu import nvcomp as gpu_decode
    from runtime_shim.gpu.cuda import check as _check

    try:
        nv = gpu_decode.Nvcomp()
    except MachineError as e:
        print(f"bench_nvcomp: skipped ({e})")
        return
    weights = _data.model("minilm", "bf16", args.copies)
    u = np.concatenate([np.frombuffer(_data.raw_bytes(w), dtype="<u2") for w in weights if w.dtype == "bfloat16"])
    plane = (
        (((u << np.uint16(1)) | (u >> np.uint16(15))) >> np.uint16(8)).astype(np.uint8).tobytes()
    )  # layout 2's top plane
    print(f"exponent plane of minilm-bf16 x{args.copies}: {len(plane) / 1e6:.1f} MB; nvCOMP at {nv.path}")
    stream = _check(rt, rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
    ev0, ev1 = _check(rt, rt.cudaEventCreate(), "cudaEventCreate"), _check(rt, rt.cudaEventCreate(), "cudaEventCreate")
    cctx = zstandard.ZstdCompressor(compression_params=store_writer.LITERALS)
    h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    print(f"{'chunk':>8s} {'stored':>8s} {'chunks':>7s} {'ms':>7s} {'GB/s of plane':>14s}")
    for kib in [int(x) for x in args.chunks_kib.split(",")]:
        size = kib << 10
        pieces = [plane[i : i + size] for i in range(0, len(plane), size)]
        comp = [cctx.compress(p) for p in pieces]
        blob = b"".join(comp)
        n = len(comp)
        stage, out = (
            _check(rt, rt.cudaMalloc(len(blob)), "cudaMalloc"),
            _check(rt, rt.cudaMalloc(n * size), "cudaMalloc"),
        )
        host = ctypes.create_string_buffer(blob, len(blob))
        _check(rt, rt.cudaMemcpy(stage, ctypes.addressof(host), len(blob), h2d), "cudaMemcpy")
        table = np.zeros((6, n), dtype=np.uint64)
        table[0] = stage + np.cumsum([0] + [len(c) for c in comp[:-1]])
        table[1] = [len(c) for c in comp]
        table[2] = [len(p) for p in pieces]
        table[3] = out + np.arange(n, dtype=np.uint64) * size
        dev = _check(rt, rt.cudaMalloc(table.nbytes), "cudaMalloc")
        _check(rt, rt.cudaMemcpy(dev, table.ctypes.data, table.nbytes, h2d), "cudaMemcpy")
        row = 8 * n
        for count in sorted({min(100, n), max(1, n // 4), n}):
            temp_bytes = nv.temp_bytes(count, size, count * size, int(stream))
            temp = _check(rt, rt.cudaMalloc(max(temp_bytes, 1)), "cudaMalloc")
            best = float("inf")
            for _ in range(3):
                _check(rt, rt.cudaEventRecord(ev0, stream), "cudaEventRecord")
                nv.decompress(
                    dev,
                    dev + row,
                    dev + 2 * row,
                    dev + 4 * row,
                    count,
                    temp,
                    temp_bytes,
                    dev + 3 * row,
                    dev + 5 * row,
                    int(stream),
                )
                _check(rt, rt.cudaEventRecord(ev1, stream), "cudaEventRecord")
                _check(rt, rt.cudaEventSynchronize(ev1), "cudaEventSynchronize")
                best = min(best, _check(rt, rt.cudaEventElapsedTime(ev0, ev1), "cudaEventElapsedTime"))
            rt.cudaFree(temp)
            back = np.zeros((6, n), dtype=np.uint64)
            _check(
                rt,
                rt.cudaMemcpy(back.ctypes.data, dev, back.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost),
                "cudaMemcpy",
            )
            statuses = np.frombuffer(back[5].tobytes(), dtype=np.int32)[:count]
            if (statuses != 0).any() or (back[4, :count] != back[2, :count]).any():
                raise SystemExit(f"FAIL: nvCOMP did not decode every {kib} KiB chunk")
            print(
                f"{kib:5d} KiB {len(blob) / len(plane) * 100:7.2f}% {count:7d} {best:7.2f} {sum(len(p) for p in pieces[:count]) / best / 1e6:14.1f}"
            )
        for ptr in (stage, out, dev):
            rt.cudaFree(ptr)
    print("(the chunk count matters until the GPU is full; below that a call takes one chunk's serial decode time)")


if __name__ == "__main__":
    main()
