"""Delta updates (issue 14): trtx-bundle diff/apply vs bsdiff4 and pyzsync on the same OLD and NEW, same run.

Model: bench_bundle_size.py's ONNX graph of all-MiniLM-L6-v2's trained weights (embedding + the six layers' FFN,
26 initializers, 75 MB of fp32), built with no engine. Three updates:
- fine-tune: 3 of the 26 tensors (10%: the last layers' FFN weights) changed as a fine-tune would (small deltas);
- new TRT-RTX version: OLD with 3 weightless engines (SM 86/89/120) and 4 runtime caches, NEW with all of them new;
- one more GPU: NEW is OLD plus one runtime cache.
Engines and caches cannot be made here (no RTX GPU): they are STAND-INS of realistic size (3 MiB per engine, 2 MiB per
cache) with 4 bits of entropy per byte (zstd ~2x; real TRT-RTX engines built here compress 1.3x to 30x).

Per tool: the bytes a user downloads (share of NEW's bytes), the time to make the update, the time to apply it.
- trtx: the .trtxd update (apply -o, every file and frame verified);
- bsdiff4: a patch between the two packed .trtx archives (file_diff / file_patch);
- pyzsync: the .zsync control file of NEW's archive plus the ranges of it the client lacks after matching blocks
  against OLD's archive (make: create_zsync_info; apply: get_patch_instructions, the block matching alone).

    python bench/bench_delta.py [--work DIR] [--skip-bsdiff]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from bench_bundle_size import minilm_onnx

from bundler.archive import pack_bundle
from bundler.build import build_bundle
from bundler.config import BuildOptions
from bundler.delta import diff_bundles
from runtime_shim.delta import apply_update
from runtime_shim.fsutil import atomic_write, sha256_bytes
from runtime_shim.manifest import CacheKey, Engine, FileRef, RuntimeCache, read_bundle_manifest

FINE_TUNED = ("encoder.layer.4.down.w", "encoder.layer.5.up.w", "encoder.layer.5.down.b")
GPUS = [("NVIDIA GeForce RTX 3080", 0x2206, 86), ("NVIDIA GeForce RTX 4090", 0x2684, 89)]
GPUS += [("NVIDIA GeForce RTX 4070", 0x2786, 89), ("NVIDIA GeForce RTX 5090", 0x2B85, 120)]
EXTRA_GPU = ("NVIDIA GeForce RTX 5080", 0x2C02, 120)


def fine_tuned(src: Path, dst: Path) -> Path:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    rng = np.random.default_rng(14)
    for init in model.graph.initializer:
        if init.name in FINE_TUNED:
            w = numpy_helper.to_array(init)
            step = (rng.standard_normal(w.shape) * float(w.std()) * 0.01).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(w + step, init.name))
    onnx.save(model, str(dst))
    return dst


def stand_in(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 16, size, dtype=np.uint8).tobytes()


def with_artifacts(src: Path, dst: Path, seed: int, gpus: list[tuple[str, int, int]]) -> Path:
    """A copy of ``src`` with one stand-in weightless engine per SM of ``gpus`` and one stand-in cache per GPU."""
    shutil.copytree(src, dst)
    bundle, _w, _s = read_bundle_manifest(dst)
    model = bundle.models[0]
    engines, caches = list(model.engines), list(model.runtime_caches)

    def put(folder: str, data: bytes) -> FileRef:
        ref = FileRef.for_content(folder, sha256_bytes(data), len(data))
        (dst / folder).mkdir(exist_ok=True)
        atomic_write(dst / ref.path, data)
        return ref

    by_sm = {e.compute_capabilities[0]: e for e in engines}
    for k, (name, pci, sm) in enumerate(gpus):
        if sm not in by_sm:
            by_sm[sm] = Engine(
                kind="weightless",
                platform="linux_x86_64",
                compute_capabilities=(sm,),
                trt_rtx_version=bundle.trt_rtx.version,
                file=put("engines", stand_in(seed * 100 + sm, 3 << 20)),
            )
            engines.append(by_sm[sm])
        key = CacheKey(
            os="linux",
            gpu_name=name,
            pci_device_id=pci,
            sm=sm,
            driver_version="580.95",
            cuda_flavour=bundle.trt_rtx.cuda_flavour,
            trt_rtx_version=bundle.trt_rtx.version,
        )
        file = put("caches", stand_in(seed * 100 + 50 + k, 2 << 20))
        caches.append(RuntimeCache(key=key, engines=(by_sm[sm].file.sha256,), file=file, created=1_700_000_000))
    model = dataclasses.replace(model, engines=tuple(engines), runtime_caches=tuple(caches))
    atomic_write(dst / "manifest.json", dataclasses.replace(bundle, models=(model,)).to_json())
    return dst


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(case: str, old: Path, new: Path, work: Path, skip_bsdiff: bool) -> list[dict]:
    work.mkdir()
    new_bytes = sum(p.stat().st_size for p in new.rglob("*") if p.is_file())
    rows = []
    r, t_make = timed(lambda: diff_bundles(old, new, work / "u.trtxd"))
    _a, t_apply = timed(lambda: apply_update(old, work / "u.trtxd", work / "applied"))
    rows.append(dict(tool="trtx diff/apply", size=r.size, make=t_make, apply=t_apply))  # type: ignore[attr-defined]
    old_a, new_a = pack_bundle(old, work / "old.trtx").path, pack_bundle(new, work / "new.trtx").path
    if not skip_bsdiff:
        import bsdiff4

        _n, t_make = timed(lambda: bsdiff4.file_diff(str(old_a), str(new_a), str(work / "p.bsdiff")))
        _n, t_apply = timed(lambda: bsdiff4.file_patch(str(old_a), str(work / "p.out"), str(work / "p.bsdiff")))
        assert (work / "p.out").read_bytes() == new_a.read_bytes()
        rows.append(
            dict(tool="bsdiff4 (archives)", size=(work / "p.bsdiff").stat().st_size, make=t_make, apply=t_apply)
        )
    import pyzsync

    info, t_make = timed(lambda: pyzsync.create_zsync_info(new_a))
    pyzsync.write_zsync_file(info, work / "new.zsync")
    instructions, t_apply = timed(lambda: pyzsync.get_patch_instructions(info, old_a))
    remote = sum(i.size for i in instructions if i.source == pyzsync.SOURCE_REMOTE)  # type: ignore[attr-defined]
    rows.append(
        dict(tool="pyzsync (archives)", size=(work / "new.zsync").stat().st_size + remote, make=t_make, apply=t_apply)
    )
    rows.append(dict(tool="whole NEW archive", size=new_a.stat().st_size, make=0.0, apply=0.0))
    for row in rows:
        row.update(case=case, new_bytes=new_bytes)
    literal = r.weight_bytes_literal  # type: ignore[attr-defined]
    if literal:
        import zstandard

        data = (work / "u.trtxd").read_bytes()
        from runtime_shim.delta_format import read_delta

        d = read_delta(work / "u.trtxd")
        at = d.offsets["weights.literals"]
        packed = len(zstandard.ZstdCompressor(level=10).compress(data[at : at + literal]))
        print(f"  {case}: zstd -10 of the {literal} literal weight bytes: {packed} ({packed / literal:.3f}x)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="folder for the bundles (default: a temp dir, removed after)")
    ap.add_argument("--skip-bsdiff", action="store_true", help="leave bsdiff4 out (minutes and ~1 GB per case)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench-delta-") if args.work is None else None
    work = Path(tmp.name if tmp else args.work)
    work.mkdir(parents=True, exist_ok=True)
    no_gpu = SimpleNamespace(gpus=())
    opts = BuildOptions(weightful=False, weightless=False, profiles=())
    src = minilm_onnx(work / "minilm.onnx")
    base = build_bundle(src, work / "base", options=opts, probe=lambda: no_gpu).bundle_dir
    tuned = build_bundle(fine_tuned(src, work / "tuned.onnx"), work / "tuned", options=opts, probe=lambda: no_gpu)
    old_e = with_artifacts(base, work / "old-engines", 1, GPUS)
    new_e = with_artifacts(base, work / "new-version", 2, GPUS)
    more = with_artifacts(old_e, work / "one-more-gpu", 3, [EXTRA_GPU])
    cases = [
        ("fine-tune (3 of 26 tensors)", base, tuned.bundle_dir),
        ("new TRT-RTX version (engines + caches)", old_e, new_e),
        ("one more GPU's runtime cache", old_e, more),
    ]
    rows = []
    for i, (case, old, new) in enumerate(cases):
        print(f"measuring: {case}", file=sys.stderr)
        rows += measure(case, old, new, work / f"case{i}", args.skip_bsdiff)
    print(
        "\n| update | NEW bytes | tool | download | share of NEW | make | apply |\n|---|---:|---|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['case']} | {r['new_bytes'] / 1e6:.2f} MB | {r['tool']} | {r['size'] / 1e6:.3f} MB | "
            f"{100 * r['size'] / r['new_bytes']:.2f}% | {r['make']:.2f} s | {r['apply']:.2f} s |"
        )
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
