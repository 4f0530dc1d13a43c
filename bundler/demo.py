"""The built-in demo: make a small ONNX model, bundle it, load it through the shim, and check its outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEMO_INPUT = "image"


def make_demo_model(directory: Path) -> Path:
    """A small image classifier (conv, relu, pool, gemm) with dynamic batch and spatial dims.

    Weights come from a seeded RNG at a trained-like scale, so the demo is the same everywhere and
    needs no download.
    """
    rng = np.random.default_rng(20261121)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", [DEMO_INPUT, "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "trtx_demo_classifier",
        [helper.make_tensor_value_info(DEMO_INPUT, TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            weight("conv1.weight", 16, 3, 3, 3),
            weight("conv1.bias", 16),
            weight("conv2.weight", 32, 16, 3, 3),
            weight("conv2.bias", 32),
            weight("fc.weight", 10, 32),
            weight("fc.bias", 10),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtx-bundler-demo")
    model.ir_version = 8  # what opset 17 needs; newer onnx releases write IRs that older ONNX Runtimes refuse
    onnx.checker.check_model(model)
    path = Path(directory) / "demo_classifier.onnx"
    onnx.save_model(model, path)
    return path


DEMO_SHAPES = {DEMO_INPUT: ((1, 3, 32, 32), (4, 3, 64, 64), (16, 3, 128, 128))}


@dataclass
class DemoResult:
    model_path: Path
    bundle_dir: Path
    backend: str
    report: Any  # runtime_shim.session.Report: what the shim chose and why
    max_abs_error: float | None  # vs onnxruntime on the original model; None if onnxruntime is missing
    output_shape: tuple[int, ...]


def run_demo(
    workdir: Path,
    *,
    progress: Any = None,
    cache_dir: Path | None = None,
    note: Callable[[str], None] = lambda _msg: None,
) -> DemoResult:
    """Make the demo model in ``workdir``, bundle it, load the bundle through the shim and run one batch.

    The output is compared with ONNX Runtime on the original model where onnxruntime is installed, which is
    the proof that the bundle (weights, skeleton, selection, verification) round-trips.
    """
    import runtime_shim
    from runtime_shim.manifest import Profile, ShapeRange

    from .build import build_bundle
    from .config import BuildOptions

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_path = make_demo_model(workdir)
    note(f"made {model_path} (a small conv net with dynamic batch and image size)")
    lo, opt, hi = DEMO_SHAPES[DEMO_INPUT]
    options = BuildOptions(
        name="demo_classifier",
        version="1.0",
        profiles=(Profile(shapes={DEMO_INPUT: ShapeRange(min=lo, opt=opt, max=hi)}),),
        warmup_shapes=({DEMO_INPUT: opt},),
        sms=(86, 89, 120),  # three RTX generations keep the demo fast; `build` defaults to all targets
        force=True,
    )
    bundle_dir = workdir / "bundle"
    result = build_bundle(model_path, bundle_dir, options=options, progress=progress)
    on_disk = (bundle_dir / "manifest.json").stat().st_size + sum(ref.size for _, ref in result.manifest.files())
    note(
        f"bundled into {bundle_dir}: {on_disk:,} bytes in all; weights {result.raw_weight_bytes:,} bytes raw, "
        f"{result.stored_weight_bytes:,} stored; {len(result.manifest.engines)} engine(s) of "
        f"{result.engine_bytes:,} bytes together"
    )

    image = np.random.default_rng(7).standard_normal((2, 3, 48, 40)).astype(np.float32)
    with runtime_shim.load(bundle_dir, app="trtx-bundler-demo", cache_dir=cache_dir) as session:
        logits = session.run({DEMO_INPUT: image})["logits"]
        report = session.report
        backend = session.backend
    note(f"ran a {image.shape} batch on {backend}: logits {logits.shape}")

    max_abs_error = None
    try:
        import onnxruntime as ort
    except ImportError:
        note("onnxruntime is not installed: skipped the comparison with the original model")
    else:
        reference = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(
            None, {DEMO_INPUT: image}
        )[0]
        max_abs_error = float(np.max(np.abs(reference - logits)))
    return DemoResult(
        model_path=model_path,
        bundle_dir=bundle_dir,
        backend=backend,
        report=report,
        max_abs_error=max_abs_error,
        output_shape=tuple(logits.shape),
    )
