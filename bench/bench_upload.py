"""Host to GPU (issue 5, target 4): the decode-into-pinned-ring pipeline vs pinned cudaMemcpy bandwidth, same run.

Baseline: one cudaMemcpy of the model's raw bytes from a pinned buffer (median of --repeat). Pipeline:
runtime_shim.gpu.upload.Uploader.upload(), device allocation included, with frames decoded either
- on the host (decode=host): read + verify (each frame's digest) + decode every frame into a ring of pinned slots on
  T threads while earlier slots copy on a non-default stream; or
- on the GPU (decode=device, needs nvCOMP): read + verify the stored frames into the ring on T threads, copy
  them to device staging memory, decode there with nvCOMP and the plane kernel, batch k decoding while k+1 copies.
Both stores are measured: the default zstd-byteplane one and the uncompressed ("none") one, their frames pinned by
--frame-digest (the bundler's default, BLAKE3, or schema 1's sha256), each row verified and not (verify_frames=False),
so verified/unverified is a ratio of one run. Also printed: host-only decode with the same threads, and the peak
pinned memory against the model size.

    python bench/bench_upload.py [--copies 8] [--dtype bf16] [--threads 1,4,8,16] [--repeat 5] [--decode host,device]
        [--frame-digest blake3|sha256]
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

import _data

from bundler.store_writer import write_weight_store
from runtime_shim.fsutil import sha256_bytes
from runtime_shim.store.digest import DEFAULT_FRAME_DIGEST, FRAME_DIGESTS
from runtime_shim.store.reader import WeightReader


def gpu_name(rt) -> str:
    from runtime_shim.errors import MachineError
    from runtime_shim.gpu.cuda import check

    try:
        return check(rt, rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties").name.decode(errors="replace")
    except MachineError:
        return "?"


def pinned_memcpy_seconds(rt, nbytes: int, repeat: int) -> float:
    from runtime_shim.gpu.cuda import check as _check

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
    from runtime_shim.gpu.cuda import check as _check

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
    ap.add_argument(
        "--copies", type=int, default=8, help="replicas of the model (distinct bytes), for a size worth timing"
    )
    ap.add_argument("--threads", default=f"1,{min(8, os.cpu_count() or 1)}")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--frame-mib", type=float, default=4, help="frame size the stores are written with (the bundler's default: 4)"
    )
    ap.add_argument(
        "--batch-mib",
        type=int,
        default=0,
        help="stored bytes per GPU decode batch (Uploader batch_bytes; 0: its default)",
    )
    ap.add_argument("--decode", default="host,device", help="where to decode: host, device (nvCOMP), or both")
    ap.add_argument(
        "--merge-mib",
        type=float,
        default=0,
        help="regroup the tensors into ~N MiB ones (a large model's profile; 0: as trained)",
    )
    ap.add_argument(
        "--frame-digest",
        default=DEFAULT_FRAME_DIGEST,
        choices=FRAME_DIGESTS,
        help=f"what the stores pin their frames by (default: {DEFAULT_FRAME_DIGEST}, the bundler's)",
    )
    args = ap.parse_args()

    rt = _data.cuda_runtime("bench_upload")
    if rt is None:
        return
    from runtime_shim.gpu import nvcomp as gpu_decode
    from runtime_shim.gpu.stats import Stats
    from runtime_shim.gpu.upload import Uploader

    decodes = args.decode.split(",")
    if "device" in decodes and gpu_decode.available() is not None:
        print(f"GPU decode rows skipped: {gpu_decode.available()} ({gpu_decode.NVCOMP_HINT})")
        decodes.remove("device")
    threads = [int(x) for x in args.threads.split(",")]
    weights = _data.model(args.model, args.dtype, args.copies)
    if args.merge_mib:
        weights = _data.merged(weights, args.merge_mib)
    print(
        f"GPU: {gpu_name(rt)}; {os.cpu_count()} CPUs; model {args.model}-{args.dtype} x{args.copies}"
        f"{f' regrouped in ~{args.merge_mib} MiB tensors' if args.merge_mib else ''}: {len(weights)} tensors; frames of {args.frame_mib} MiB, "
        f"pinned by {args.frame_digest}"
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("TRTX_BENCH_TMP")) as tmp:
        stores = {}
        for enc in ("zstd-byteplane", "none"):
            t0 = time.perf_counter()
            stores[enc] = write_weight_store(
                weights,
                Path(tmp) / enc,
                encoding=enc,
                threads=os.cpu_count(),
                chunk_bytes=int(args.frame_mib * 2**20),
                frame_digest=args.frame_digest,
            )
            print(f"  wrote {enc} store: {stores[enc].file.size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        raw = sum(b.nbytes for b in stores["none"].blobs)
        for enc, store in stores.items():  # into the page cache
            (Path(tmp) / enc / store.file.path).read_bytes()

        t_copy = pinned_memcpy_seconds(rt, raw, args.repeat)
        bw = raw / t_copy
        print(f"\nbaseline: pinned cudaMemcpy of {raw / 1e6:.1f} MB: {bw / 1e9:.2f} GB/s (median of {args.repeat})")
        print(
            f"{'store':16s} {'decode':7s} {'verify':6s} {'T':>3s} {'host-decode GB/s':>16s} {'pipeline GB/s':>14s} {'vs memcpy':>10s} {'pinned MiB':>11s}"
        )
        rows = []
        upload_s: dict[tuple[str, str, int, bool], float] = {}  # for verified/unverified, same run
        for enc in stores:
            for decode in decodes if enc != "none" else ["host"]:
                rows += [(enc, decode, t, v) for t in threads for v in (True, False)]
        for enc, decode, T, verify in rows:
            store = stores[enc]
            with WeightReader(Path(tmp) / enc, store, threads=T, verify_frames=verify) as reader:
                t_dec = None
                if decode == "host":

                    def decode_only() -> None:
                        for _, _buf in reader.iter_blobs():
                            pass

                    t_dec = _data.median_time(decode_only, args.repeat)
                slot = max(max(f.raw_size, f.size) for b in store.blobs for f in b.frames)
                stats = Stats()  # seconds by step on the calling thread, printed under each row
                with Uploader(
                    threads=T, slot_bytes=slot, decode=decode, batch_bytes=(args.batch_mib << 20) or None, stats=stats
                ) as up:
                    dw = up.upload(reader)  # warm-up, and the correctness check
                    assert up.decoded_on == ("gpu" if decode == "device" else "host"), up.decode_why
                    check_on_device(rt, reader, dw)
                    dw.free()
                    stats.clear()
                    calls = []  # freed after the timing: cudaFree is not part of loading (the weights stay on the GPU)
                    t_up = _data.median_time(lambda calls=calls: calls.append(up.upload(reader)), args.repeat)
                    upload_s[enc, decode, T, verify] = t_up
                    for dw in calls:
                        dw.free()
                    pinned = up.pinned_bytes
                    spent = ", ".join(f"{k} {v / len(calls) * 1e3:.1f} ms" for k, v in stats.items())
            host_col = f"{raw / t_dec / 1e9:16.2f}" if t_dec else f"{'-':>16s}"
            print(
                f"{enc:16s} {decode:7s} {'yes' if verify else 'no':6s} {T:3d} {host_col} {raw / t_up / 1e9:14.2f} {t_copy / t_up:9.2f}x {pinned / 2**20:11.0f}"
                f"   (model {raw / 2**20:.0f} MiB, stored {store.file.size / 2**20:.0f} MiB)",
                flush=True,
            )
            print(f"{'':16s} calling thread, per upload of {t_up * 1e3:.0f} ms: {spent}")
        for (enc, decode, T, verify), t_verified in upload_s.items():
            if verify and (t_plain := upload_s.get((enc, decode, T, False))):
                print(
                    f"verified/unverified ({args.frame_digest}), {enc}, decode {decode}, T={T}: "
                    f"{t_plain / t_verified:.2f}x (target >= 0.8x)"
                )
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"\ntarget: pipeline >= 0.8x pinned memcpy. verify 'no' = verify_frames=False (no frame's {args.frame_digest} checked). "
            f"GPU decode also holds 6 x batch of device memory (batch: {args.batch_mib or 'half the stored bytes, 16-256'} MiB). peak RSS {rss:.0f} MiB (includes the source tensors)"
        )


if __name__ == "__main__":
    main()
