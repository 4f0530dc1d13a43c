"""Several models in one bundle (issue 13): bytes and build time of one multi-model bundle vs one bundle per model.

Two cases, on real trained weights (bench/_data.py):
(a) a three-model pipeline, three different graphs: silero-vad 6.2.3 as shipped (silero_vad_op18_ifless.onnx),
    an encoder made of MiniLM-L6's feed-forward layers 0-2, and a head made of layers 3-5 plus the pooler;
(b) two fine-tunes of one model (MiniLM-L6's six feed-forward layers plus the pooler) that differ only in their
    last layers: layer 5 and the pooler nudged as a fine-tune would (w + N(0, 0.02 * std(w))), each with its own seed.
Every bundle is built without engines (weightful and weightless off; the parser check still runs), so the bytes are
the manifest, the skeletons and the weight store: what sharing changes. Build times are medians of --repeat builds,
the multi-model bundle against the sum of the separate ones, in the same run.

    python bench/bench_multi_model.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data
import numpy as np

SILERO_PROFILE = {
    "input": ((1, 576), (1, 576), (4, 576)),
    "state": ((2, 1, 128), (2, 1, 128), (2, 4, 128)),
}  # as bench_bundle_size.py
FFN_PROFILE = {"x": ((1, 384), (4, 384), (16, 384))}


def minilm() -> dict[str, np.ndarray]:
    return {
        w.name: np.frombuffer(_data.raw_bytes(w), np.float32).reshape(w.shape)
        for w in _data.minilm_weights()
        if w.dtype == "float32"
    }


def ffn_onnx(
    path: Path, w: dict[str, np.ndarray], layers: range, *, pooler: bool, nudge: tuple[set[str], int] | None = None
) -> Path:
    """MiniLM's feed-forward layers ``layers`` (MatMul+Add+Relu, MatMul+Add) and optionally the pooler (Gemm+Tanh).

    ``nudge`` = (tensor names, seed): those tensors get w + N(0, 0.02 * std(w)), as after fine-tuning.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    names, seed = nudge or (set(), 0)
    rng = np.random.default_rng(seed)

    def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
        if name in names:
            arr = (arr + rng.standard_normal(arr.shape) * 0.02 * float(arr.std())).astype(np.float32)
        return numpy_helper.from_array(np.ascontiguousarray(arr), name)

    inits, nodes, x = [], [], "x"
    for i in layers:
        p = f"encoder.layer.{i}."
        for kind, src in (("up", "intermediate.dense"), ("down", "output.dense")):
            inits += [init(f"{p}{kind}.w", w[p + src + ".weight"].T), init(f"{p}{kind}.b", w[p + src + ".bias"])]
            nodes += [
                helper.make_node("MatMul", [x, f"{p}{kind}.w"], [f"{p}{kind}.mm"]),
                helper.make_node("Add", [f"{p}{kind}.mm", f"{p}{kind}.b"], [f"{p}{kind}.out"]),
            ]
            x = f"{p}{kind}.out"
            if kind == "up":
                nodes.append(helper.make_node("Relu", [x], [f"{p}act"]))
                x = f"{p}act"
    if pooler:
        inits += [init("pooler.w", w["pooler.dense.weight"]), init("pooler.b", w["pooler.dense.bias"])]
        nodes += [
            helper.make_node("Gemm", [x, "pooler.w", "pooler.b"], ["pooled"], transB=1),
            helper.make_node("Tanh", ["pooled"], ["y"]),
        ]
        x = "y"
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 384])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 384])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def spec(source: Path, name: str, profile: dict):
    from bundler.build import ModelSpec
    from runtime_shim.manifest import Profile, ShapeRange

    shapes = {k: ShapeRange(min=a, opt=b, max=c) for k, (a, b, c) in profile.items()}
    return ModelSpec(source=source, name=name, profiles=(Profile(shapes=shapes),))


def bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(label: str, specs: list, tmp: Path, repeat: int) -> dict:
    """Build the models as one bundle and as one bundle each; bytes of each layout and median build times."""
    from bundler.build import build_bundle
    from bundler.config import BuildOptions
    from bundler.store_sharing import store_sharing

    options = BuildOptions(weightful=False, weightless=False)
    counter = iter(range(10**6))

    def build(models: list) -> Path:
        out = tmp / f"{label}-{next(counter)}"
        build_bundle(None, out, options=options, models=models)
        return out

    one = build(specs)
    separate = [build([s]) for s in specs]
    bundle = build_bundle(None, tmp / f"{label}-check", options=options, models=specs).bundle
    sharing = store_sharing(bundle)
    multi_store = bundle.weights.file.size
    sep_store = sum(
        next(p for p in (d / "weights").iterdir() if p.name.endswith(".trtxw")).stat().st_size for d in separate
    )
    row = {
        "label": label,
        "raw": sharing.raw_bytes,
        "separate_raw": sum(m.raw_bytes for m in sharing.models),
        "multi_store": multi_store,
        "separate_store": sep_store,
        "multi_total": bundle_bytes(one),
        "separate_total": sum(bundle_bytes(d) for d in separate),
        "shared_blobs": sharing.shared_blobs,
        "blobs": sharing.blobs,
    }

    def clean_build(models: list) -> None:
        shutil.rmtree(build(models))

    row["multi_s"] = _data.median_time(lambda: clean_build(specs), repeat)
    row["separate_s"] = sum(_data.median_time(lambda s=s: clean_build([s]), repeat) for s in specs)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    w = minilm()
    last = {"encoder.layer.5.up.w", "encoder.layer.5.up.b", "encoder.layer.5.down.w", "encoder.layer.5.down.b"}
    last |= {"pooler.w", "pooler.b"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pipeline = [
            spec(_data.fetch(_data.SILERO_IFLESS), "vad", SILERO_PROFILE),
            spec(ffn_onnx(tmp / "encoder.onnx", w, range(0, 3), pooler=False), "encoder", FFN_PROFILE),
            spec(ffn_onnx(tmp / "head.onnx", w, range(3, 6), pooler=True), "head", FFN_PROFILE),
        ]
        rows.append(measure("(a) pipeline: vad + encoder + head", pipeline, tmp, args.repeat))
        tunes = [
            spec(ffn_onnx(tmp / f"{n}.onnx", w, range(6), pooler=True, nudge=(last, seed)), n, FFN_PROFILE)
            for n, seed in (("tune_a", 1), ("tune_b", 2))
        ]
        rows.append(measure("(b) two fine-tunes (last layer + pooler differ)", tunes, tmp, args.repeat))

    def mb(n: float) -> str:
        return f"{n / 1e6:.2f} MB"

    print(f"machine: {platform.machine()} {platform.processor() or ''} x{_cores()} cores; repeat {args.repeat}")
    print(
        "| case | raw weights (each blob once / per model) | shared blobs | store: one bundle / separate | ratio "
        "| whole bundle: one / separate | ratio | build time: one / separate | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {mb(r['raw'])} / {mb(r['separate_raw'])} | {r['shared_blobs']} of {r['blobs']} "
            f"| {mb(r['multi_store'])} / {mb(r['separate_store'])} | **{r['multi_store'] / r['separate_store']:.3f}x** "
            f"| {mb(r['multi_total'])} / {mb(r['separate_total'])} | {r['multi_total'] / r['separate_total']:.3f}x "
            f"| {r['multi_s']:.2f} s / {r['separate_s']:.2f} s | {r['multi_s'] / r['separate_s']:.2f}x |"
        )


def _cores() -> int:
    import os

    return os.cpu_count() or 1


if __name__ == "__main__":
    main()
