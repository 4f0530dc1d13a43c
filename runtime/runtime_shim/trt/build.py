"""TensorRT for RTX engine builds from an ONNX file: weightful multi-SM (no GPU needed) or weightless for this GPU.

Written to NVIDIA's documented TRT-RTX 1.7 Python API (see ../shared/TRT_RTX_NOTES.md). `tensorrt_rtx` is
imported lazily so that manifests, choice and the fallback work on machines without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EngineBuildError
from ..targets import CC_NAMES, SUPPORTED_SMS

log = logging.getLogger(__name__)


def trt() -> Any:
    """tensorrt_rtx, imported on first use; EngineBuildError saying what to install when it is missing."""
    try:
        import tensorrt_rtx
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        raise EngineBuildError(
            f"cannot import tensorrt_rtx ({e})", hint="pip install tensorrt-rtx==1.7.1.116"
        ) from None
    return tensorrt_rtx


def make_logger() -> Any:
    """A TRT-RTX ILogger that forwards to `logging` and keeps errors (``.errors``) for the exception message.

    Built on first use: its base class comes from tensorrt_rtx, which is imported lazily."""
    t = trt()
    base: Any = t.ILogger

    class Forwarder(base):
        def __init__(self) -> None:
            base.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity <= base.Severity.ERROR:
                self.errors.append(msg)
                log.debug("TRT-RTX: %s", msg)
            elif severity == base.Severity.WARNING:
                log.debug("TRT-RTX warning: %s", msg)

    return Forwarder()


@dataclass(frozen=True)
class BuildRequest:
    onnx_path: str  # external data resolves relative to this file
    profiles: Sequence[Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]]  # name -> (min, opt, max)
    compute_capabilities: Sequence[int] = ()  # () = TRT-RTX's default targets; weightless needs exactly [0] = CURRENT
    weightless: bool = False  # STRIP_PLAN + REFIT_IDENTICAL: needs a supported GPU and CURRENT
    windows_target: bool = False  # RuntimePlatform.WINDOWS_AMD64 (refused by TRT-RTX on a machine without a GPU)


def build_engine(req: BuildRequest) -> bytes:
    """Parse the ONNX file and build a serialized engine. Parser and builder errors become EngineBuildError."""
    t = trt()
    logger = make_logger()
    builder = t.Builder(logger)
    network = builder.create_network()
    parser = t.OnnxParser(network, logger)
    if not parser.parse_from_file(str(req.onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = (
                f"node {err.node()} ({err.node_name() or '?'}, op {err.node_operator() or '?'})"
                if err.node() >= 0
                else "model"
            )
            errors.append(f"{node}: {err.desc()}")
        raise EngineBuildError(
            f"{req.onnx_path}: TensorRT for RTX could not parse the model:\n  "
            + "\n  ".join(errors or logger.errors or ["(no detail given)"]),
            hint="the first failing node is named above; replace or decompose that op in the model",
        )
    config = builder.create_builder_config()
    for shapes in req.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    if req.weightless:
        config.set_flag(t.BuilderFlag.STRIP_PLAN)
        config.set_flag(t.BuilderFlag.REFIT_IDENTICAL)
        config.num_compute_capabilities = 1  # the count must be set before the entries
        config.set_compute_capability(t.ComputeCapability.CURRENT, 0)
    elif req.compute_capabilities:
        unknown = [sm for sm in req.compute_capabilities if sm not in CC_NAMES]
        if unknown:
            raise EngineBuildError(
                f"compute capabilities {unknown} are not targets of TensorRT for RTX",
                hint=f"choose from {', '.join(str(s) for s in SUPPORTED_SMS)}",
            )
        config.num_compute_capabilities = len(req.compute_capabilities)
        for i, sm in enumerate(req.compute_capabilities):
            config.set_compute_capability(getattr(t.ComputeCapability, CC_NAMES[sm]), i)
    if req.windows_target:
        config.runtime_platform = t.RuntimePlatform.WINDOWS_AMD64
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"{req.onnx_path}: TensorRT for RTX could not build the engine:\n  "
            + "\n  ".join(logger.errors or ["(no detail given)"])
        )
    return bytes(memoryview(plan))
