"""Codec study (issue 5, target 1 and part of 2): weight store ratio vs plain zstd-3 and ZipNN, on real weights.

For each model (silero-vad 6.2.3, all-MiniLM-L6-v2) in fp32 and cast to fp16 and bf16, over its floating tensors:
stored/raw for plain zstd at several levels, the byte-plane layout 1 (one zstd frame, a block per plane), the
store's encoding (layout 2: sign-rotated planes, each raw or its own zstd frame) and ZipNN; ZipNN's round trip is
checked bit for bit. Then single-thread decode speed of the same tensors against plain zstd-3 decoding.

    python bench/bench_compression.py [--models silero,minilm] [--repeat 5] [--slow]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data
import numpy as np
import zstandard

from bundler.store_writer import DEFAULT_CHUNK, MIN_SAVING, encode_frame
from runtime_shim.store.decode import decode_frame_into
from runtime_shim.store.format import FLOAT_DTYPES, ITEMSIZE

ZIPNN_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def frames_of(raw: memoryview, es: int, chunk: int = DEFAULT_CHUNK) -> list[memoryview]:
    step = chunk - chunk % es
    return [raw[p : p + step] for p in range(0, len(raw), step)]


def layout1(raw: memoryview, es: int, level: int) -> bytes:
    """The store's previous zstd-byteplane frame (kept readable): planes in one zstd frame, a block per plane."""
    planes = np.frombuffer(raw, np.uint8).reshape(-1, es).T.copy()
    cobj = zstandard.ZstdCompressor(level=level).compressobj(size=len(raw))
    parts = []
    for p in planes:
        parts += [cobj.compress(p.data), cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
    return b"".join(parts + [cobj.flush()])


def study(label: str, weights: list, repeat: int, slow: bool) -> dict:
    tensors = [(w, _data.raw_bytes(w)) for w in weights if w.dtype in FLOAT_DTYPES and len(_data.raw_bytes(w))]
    raw_total = sum(len(r) for _, r in tensors)
    sizes: dict[str, int] = {}
    levels = (3, 9, 19) if slow else (3, 9)
    for lvl in levels:
        cctx = zstandard.ZstdCompressor(level=lvl)
        sizes[f"zstd-{lvl}"] = sum(len(cctx.compress(f)) for w, r in tensors for f in frames_of(r, 1))
    sizes["byteplane layout 1 (zstd-3)"] = sum(
        len(layout1(f, ITEMSIZE[w.dtype], 3)) for w, r in tensors for f in frames_of(r, ITEMSIZE[w.dtype])
    )
    # What the store writes: layout 2 frames, or the blob as is ("none") where that saves under MIN_SAVING.
    ours, encodings = [], []
    for w, r in tensors:
        fs = [encode_frame(f, "zstd-byteplane", ITEMSIZE[w.dtype], 3) for f in frames_of(r, ITEMSIZE[w.dtype])]
        plain = sum(map(len, fs)) > len(r) * (1 - MIN_SAVING)
        ours.append([bytes(f) for f in frames_of(r, ITEMSIZE[w.dtype])] if plain else fs)
        encodings.append("none" if plain else "zstd-byteplane")
    sizes["store: byteplane layout 2"] = sum(len(s) for fs in ours for s in fs)

    zipnn_note = "not installed (pip install zipnn)"
    zipnn_blobs = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from zipnn import ZipNN
        zipnn_blobs, bad, mutated = [], 0, 0
        for w, r in tensors:
            z = ZipNN(input_format="byte", bytearray_dtype=ZIPNN_DTYPE[w.dtype], threads=1)
            original = bytes(r)
            given = bytes(bytearray(original))  # a fresh object: ZipNN may reorder its input in place
            c = z.compress(given)
            mutated += given != original
            bad += bytes(z.decompress(c)) != original
            zipnn_blobs.append((z, c))
        sizes["ZipNN 0.5 (threads=1)"] = sum(len(c) for _, c in zipnn_blobs)
        zipnn_note = f"round trip bit-exact on {len(tensors) - bad}/{len(tensors)} tensors" + (
            f"; compress() rewrote its input bytes object in place for {mutated} tensors" if mutated else ""
        )
    except ImportError:
        pass

    print(f"\n== {label}: {len(tensors)} float tensors, {raw_total / 1e6:.2f} MB raw, {DEFAULT_CHUNK >> 20} MiB frames")
    base = sizes["zstd-3"]
    zn = sizes.get("ZipNN 0.5 (threads=1)")
    for name, size in sizes.items():
        extra = f"  vs ZipNN {size / zn:.4f}x" if zn else ""
        print(f"  {name:30s} {size / raw_total:7.2%} of raw   vs zstd-3 {size / base:.4f}x{extra}")
    print(f"  ZipNN: {zipnn_note}")

    # ---- single-thread decode speed, same tensors, median of `repeat`
    z3 = [[zstandard.ZstdCompressor(level=3).compress(f) for f in frames_of(r, 1)] for _, r in tensors]
    dctx = zstandard.ZstdDecompressor()
    outs = [bytearray(len(r)) for _, r in tensors]

    def dec_zstd3() -> None:
        for fs in z3:
            for c in fs:
                dctx.decompress(c)

    def dec_ours() -> None:
        for (w, r), fs, enc, out in zip(tensors, ours, encodings, outs):
            es, pos, mv = ITEMSIZE[w.dtype], 0, memoryview(out)
            for f, s in zip(frames_of(r, es), fs):
                decode_frame_into(s, enc, es, mv[pos : pos + len(f)])
                pos += len(f)

    dec_ours()
    assert all(bytes(o) == bytes(r) for o, (_, r) in zip(outs, tensors)), "layout 2 round trip is not bit-exact"
    t_base = _data.median_time(dec_zstd3, repeat)
    t_ours = _data.median_time(dec_ours, repeat)
    print(
        f"  decode 1 thread: zstd-3 {raw_total / t_base / 1e9:.2f} GB/s (baseline); "
        f"store {raw_total / t_ours / 1e9:.2f} GB/s = {t_base / t_ours:.2f}x (target >= 0.8x)",
        end="",
    )
    if zipnn_blobs:
        t_zn = _data.median_time(lambda: [z.decompress(c) for z, c in zipnn_blobs], repeat)
        print(f"; ZipNN {raw_total / t_zn / 1e9:.2f} GB/s = {t_base / t_zn:.2f}x", end="")
    print()
    return {"label": label, "raw": raw_total, **sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="silero,minilm")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--slow", action="store_true", help="also zstd-19 (minutes on MiniLM)")
    args = ap.parse_args()
    rows = [study(label, weights, args.repeat, args.slow) for label, weights in _data.models(args.models).items()]
    print("\nsummary (stored/raw):")
    print(f"  {'set':12s} {'zstd-3':>8s} {'ZipNN':>8s} {'store':>8s}  store/zstd-3  store/ZipNN")
    for r in rows:
        zn = r.get("ZipNN 0.5 (threads=1)")
        ours = r["store: byteplane layout 2"]
        print(
            f"  {r['label']:12s} {r['zstd-3'] / r['raw']:8.2%} {(zn / r['raw']) if zn else float('nan'):8.2%} {ours / r['raw']:8.2%}"
            f"  {ours / r['zstd-3']:11.4f}x  {(ours / zn) if zn else float('nan'):10.4f}x"
        )


if __name__ == "__main__":
    main()
