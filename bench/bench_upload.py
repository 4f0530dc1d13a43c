"""Host to GPU (issue 5, target 4): the decode-into-pinned-ring pipeline vs pinned cudaMemcpy bandwidth, same run.

Baseline: one cudaMemcpy of the model's raw bytes from a pinned buffer (median of --repeat). Pipeline:
runtime_shim.gpu_upload.Uploader.upload(), i.e. read + sha256-verify + decode every frame into a ring of pinned
slots on T threads while earlier slots copy on a non-default stream, device allocation included. Both stores are
measured: the default zstd-byteplane one and the uncompressed ("none") one. Also printed: host-only decode with
the same threads (the bound the GPU cannot lift) and the peak pinned memory against the model size.

    python bench/bench_upload.py [--copies 8] [--dtype bf16] [--threads 1,4,8,16] [--repeat 5]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data  # noqa: E402
from bundler.weights_writer import write_weight_store  # noqa: E402
from runtime_shim.errors import MachineError  # noqa: E402
from runtime_shim.fsutil import sha256_bytes  # noqa: E402
from runtime_shim.weights import WeightReader  # noqa: E402



def gpu_name(rt) -> str:
    err, props = rt.cudaGetDeviceProperties(0)
    return props.name.decode(errors="replace") if int(err) == 0 else "?"


def pinned_memcpy_seconds(rt, nbytes: int, repeat: int) -> float:
    from runtime_shim.gpu_upload import _check

    host = _check(rt, rt.cudaMallocHost(nbytes), "cudaMallocHost")
    dev = _check(rt, rt.cudaMalloc(nbytes), "cudaMalloc")
    try:
        ctypes.memset(host, 1, nbytes)  # touch every page
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        _check(rt, rt.cudaMemcpy(dev, host, nbytes, h2d), "cudaMemcpy")  # warm-up
        return _data.median_time(lambda: _check(rt, rt.cudaMemcpy(dev, host, nbytes, h2d), "cudaMemcpy"), repeat)
    finally:
        rt.cudaFree(dev)
        rt.cudaFreeHost(host)


def check_on_device(rt, reader: WeightReader, dw) -> None:
    """Copy every blob back and compare with its raw sha256 (once, outside the timings)."""
    from runtime_shim.gpu_upload import _check

    seen = set()
    for t in reader.store.tensors:
        if t.blob in seen:
            continue
        seen.add(t.blob)
        d = dw.tensors[t.name]
        back = bytearray(d.nbytes)
        if d.nbytes:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(back))
            _check(rt, rt.cudaMemcpy(addr, d.ptr, d.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy D2H")
        if sha256_bytes(back) != reader.store.blobs[t.blob].sha256:
            raise SystemExit(f"FAIL: {t.name} differs on the device")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--copies", type=int, default=8, help="replicas of the model (distinct bytes), for a size worth timing")
    ap.add_argument("--threads", default=f"1,{min(8, os.cpu_count() or 1)}")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    try:
        from runtime_shim.gpu_upload import Uploader, _cudart
        rt = _cudart()
        from runtime_shim.gpu_upload import _check
        _check(rt, rt.cudaSetDevice(0), "cudaSetDevice(0)")
    except MachineError as e:
        print(f"bench_upload: skipped, no usable GPU here ({e})")
        return

    weights = _data.scaled(_data.models(args.model)[f"{args.model}-{args.dtype}"], args.copies)
    print(f"GPU: {gpu_name(rt)}; {os.cpu_count()} CPUs; model {args.model}-{args.dtype} x{args.copies}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TRTX_BENCH_TMP")) as tmp:
        stores = {}
        for enc in ("zstd-byteplane", "none"):
            t0 = time.perf_counter()
            stores[enc] = write_weight_store(weights, Path(tmp) / enc, encoding=enc, threads=os.cpu_count())
            print(f"  wrote {enc} store: {stores[enc].file.size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        raw = sum(b.nbytes for b in stores["none"].blobs)
        for enc, store in stores.items():  # into the page cache
            (Path(tmp) / enc / store.file.path).read_bytes()

        t_copy = pinned_memcpy_seconds(rt, raw, args.repeat)
        bw = raw / t_copy
        print(f"\nbaseline: pinned cudaMemcpy of {raw / 1e6:.1f} MB: {bw / 1e9:.2f} GB/s (median of {args.repeat})")
        print(f"{'store':25s} {'T':>3s} {'decode-only GB/s':>16s} {'pipeline GB/s':>14s} {'vs memcpy':>10s} {'pinned MiB':>11s}")
        for enc, store in stores.items():
            for T, verify in [(int(x), True) for x in args.threads.split(",")] + [(int(args.threads.split(",")[-1]), False)]:
                with WeightReader(Path(tmp) / enc, store, threads=T, verify_frames=verify) as reader:
                    host = memoryview(bytearray(max(b.nbytes for b in store.blobs)))

                    def decode_only() -> None:
                        for _, _buf in reader.iter_blobs():
                            pass

                    t_dec = _data.median_time(decode_only, args.repeat)
                    del host
                    with Uploader(threads=T) as up:
                        dw = up.upload(reader)  # warm-up, and the correctness check
                        check_on_device(rt, reader, dw)
                        dw.free()
                        t_up = _data.median_time(lambda: up.upload(reader).free(), args.repeat)
                        pinned = up.pinned_bytes
                print(f"{enc + ('' if verify else ' (no sha256)'):25s} {T:3d} {raw / t_dec / 1e9:16.2f} {raw / t_up / 1e9:14.2f} {t_copy / t_up:9.2f}x {pinned / 2**20:11.0f}"
                      f"   (model {raw / 2**20:.0f} MiB)")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\ntarget: pipeline >= 0.8x pinned memcpy ('no sha256': verify_frames=False, to show the bound without hashing). peak RSS of this process {rss:.0f} MiB (includes the source tensors)")


if __name__ == "__main__":
    main()
