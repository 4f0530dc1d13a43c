"""Bundle size (issue 5, target 5): our bundle for 4 SMs x 2 platforms vs the naive layout, on real weights.

Model: an ONNX graph made here from all-MiniLM-L6-v2's trained weights (embedding Gather, mean, then the six
layers' feed-forward MatMul+Add+Relu: 90 MB of fp32); and silero-vad 6.2.3 as shipped
(silero_vad_op18_ifless.onnx: TRT-RTX 1.7.1 cannot build silero_vad.onnx).
Naive layout: one weightful engine per SM and platform. Ours: manifest + skeleton + weight store + one weightless
engine per SM and platform.

What is measured and what is estimated (printed too): weightful engines are real TRT-RTX builds for each SM, on
this machine (no GPU needed). Weightless engines cannot be built without a supported GPU, so their size is
ESTIMATED as the same SM's weightful engine minus the model's raw weight bytes. Windows engines cannot be built
on Linux without a GPU either, so each Windows engine is ESTIMATED at the size of the Linux one.

    python bench/bench_bundle_size.py [--model minilm,silero] [--sms 80,86,89,120]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _data
import numpy as np


def minilm_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = {
        x.name: np.frombuffer(_data.raw_bytes(x), np.float32).reshape(x.shape)
        for x in _data.minilm_weights()
        if x.dtype == "float32"
    }
    inits = [numpy_helper.from_array(w["embeddings.word_embeddings.weight"], "emb")]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["tok"], axis=0),
        helper.make_node("ReduceMean", ["tok", "axes"], ["h0"], keepdims=0),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    x = "h0"
    for i in range(6):
        p = f"encoder.layer.{i}."
        for kind, src in (("up", "intermediate.dense"), ("down", "output.dense")):
            inits += [
                numpy_helper.from_array(np.ascontiguousarray(w[p + src + ".weight"].T), f"{p}{kind}.w"),
                numpy_helper.from_array(w[p + src + ".bias"], f"{p}{kind}.b"),
            ]
            nodes += [
                helper.make_node("MatMul", [x, f"{p}{kind}.w"], [f"{p}{kind}.mm"]),
                helper.make_node("Add", [f"{p}{kind}.mm", f"{p}{kind}.b"], [f"{p}{kind}.out"]),
            ]
            x = f"{p}{kind}.out"
            if kind == "up":
                nodes.append(helper.make_node("Relu", [x], [f"{p}act"]))
                x = f"{p}act"
    graph = helper.make_graph(
        nodes,
        "minilm_ffn",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 16])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 384])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


SILERO_PROFILE = {
    "input": ((1, 576), (1, 576), (4, 576)),
    "state": ((2, 1, 128), (2, 1, 128), (2, 4, 128)),
}  # as tests/test_build.py


def measure(label: str, onnx_path: Path, sms: list[int], tmp: Path, profile: dict | None = None) -> None:
    from bundler.build import build_bundle
    from bundler.config import BuildOptions
    from runtime_shim.manifest import Profile, ShapeRange
    from runtime_shim.trt.build import BuildRequest, build_engine

    result = build_bundle(
        onnx_path,
        tmp / f"{label}-bundle",
        options=BuildOptions(
            weightful=False,
            weightless=False,
            profiles=(Profile(shapes={k: ShapeRange(min=a, opt=b, max=c) for k, (a, b, c) in profile.items()}),)
            if profile
            else (),
        ),
    )
    m = result.manifest
    manifest_bytes = (result.bundle_dir / "manifest.json").stat().st_size
    store, skeleton, raw_w = m.weights.file.size, m.skeleton.file.size, result.raw_weight_bytes
    profiles = [{name: (r.min, r.opt, r.max) for name, r in p.shapes.items()} for p in m.profiles]
    weightful = {
        sm: len(build_engine(BuildRequest(onnx_path=str(onnx_path), profiles=profiles, compute_capabilities=[sm])))
        for sm in sms
    }
    multi = len(build_engine(BuildRequest(onnx_path=str(onnx_path), profiles=profiles, compute_capabilities=sms)))
    weightless = {sm: max(0, size - raw_w) for sm, size in weightful.items()}
    n_plat = 2
    naive = n_plat * sum(weightful.values())
    reference = store + n_plat * sum(weightless.values())
    ours = manifest_bytes + skeleton + reference

    def mb(b: float) -> str:
        return f"{b / 1e6:10.2f} MB"

    print(f"\n== {label}: raw weights {raw_w / 1e6:.2f} MB; SMs {sms} x 2 platforms (linux_x86_64, windows_amd64)")
    for sm in sms:
        print(
            f"  weightful engine SM {sm}: {mb(weightful[sm])} (built here)   weightless SM {sm}: {mb(weightless[sm])} (ESTIMATE: weightful - raw weights)"
        )
    print(f"  one weightful engine for all {len(sms)} SMs: {mb(multi)} (built here)")
    print(f"  {'layout':58s} {'bytes':>13s} {'vs naive':>9s}")
    print(f"  {'naive: 8 weightful engines (Windows = Linux size, ESTIMATE)':58s} {mb(naive)} {1:8.2f}x")
    print(f"  {'ours: manifest + skeleton + store + 8 weightless (ESTIMATE)':58s} {mb(ours)} {ours / naive:8.2f}x")
    print(
        f"  {'  of which manifest / skeleton / weight store':58s} {manifest_bytes / 1e6:.3f} / {skeleton / 1e6:.3f} / {store / 1e6:.2f} MB"
    )
    print(f"  {'reference: store + 8 weightless engines':58s} {mb(reference)} {reference / naive:8.2f}x")
    print(
        f"  {'ours + one multi-SM weightful per platform (fallback)':58s} {mb(ours + n_plat * multi)} {(ours + n_plat * multi) / naive:8.2f}x"
    )
    print(f"  target: ours / reference = {ours / reference:.4f}x (<= 1.05x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm,silero")
    ap.add_argument("--sms", default="80,86,89,120")
    args = ap.parse_args()
    sms = [int(s) for s in args.sms.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.model.split(","):
            path = minilm_onnx(tmp / "minilm_ffn.onnx") if name == "minilm" else _data.fetch(_data.SILERO_IFLESS)
            measure(name, path, sms, tmp, None if name == "minilm" else SILERO_PROFILE)


if __name__ == "__main__":
    main()
