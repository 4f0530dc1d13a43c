"""TensorRT for RTX engine builds from an ONNX file: weightful multi-SM (no GPU needed) or weightless for this GPU.

Written to NVIDIA's documented TRT-RTX 1.7 Python API (see ../shared/TRT_RTX_NOTES.md). `tensorrt_rtx` is
imported lazily so that manifests, choice and the fallback work on machines without it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EngineBuildError
from ..manifest import ParseVerdict, UnsupportedOp
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
    source: str | None = None  # the user's model, named in errors (onnx_path may be a temporary normalized copy)

    @property
    def shown_path(self) -> str:
        return self.source or str(self.onnx_path)


class ModelParseError(EngineBuildError):
    """TRT-RTX's ONNX parser refused the model; ``verdict`` lists each refused op type once (for the manifest)."""

    def __init__(self, message: str, *, verdict: ParseVerdict, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.verdict = verdict


FIRST_NODES = 3  # node names kept per unsupported op type
PARSE_HINT = (
    "TensorRT for RTX has no implementation for the ops above: replace or decompose them in the model, "
    "or pass --no-weightful: the bundle still ships the weights and skeleton, which the ONNX Runtime fallback runs "
    "(the manifest records that TRT-RTX cannot parse the model, so no machine tries to build an engine from it)"
)


def _verdict_from(parser: Any, logger: Any) -> ParseVerdict:
    """Group the parser's errors by op type: each op once, with its node count and first node names."""
    by_op: dict[str, tuple[list[str], list[str]]] = {}  # op -> (node names, details)
    model_level: list[str] = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        desc = str(err.desc()).strip()
        if err.node() < 0 or not err.node_operator():
            model_level.append(desc)
            continue
        domain = ""
        with contextlib.suppress(Exception):  # not every build of the parser exposes the domain
            domain = str(err.node_domain() or "")
        op = (f"{domain}.{err.node_operator()}" if domain and domain != "ai.onnx" else str(err.node_operator()))[:256]
        names, details = by_op.setdefault(op, ([], []))
        names.append(str(err.node_name() or f"#{err.node()}")[:256])
        # "false" is what an op checker that simply refuses says: nothing to add to "unsupported".
        if desc and desc.lower() != "false" and desc not in details:
            details.append(desc)
    ops = tuple(
        UnsupportedOp(
            op=op,
            count=len(names),
            nodes=tuple(names[:FIRST_NODES]),
            detail="; ".join(d[:300] for d in details[:2]) or None,
        )
        for op, (names, details) in by_op.items()
    )
    detail = "; ".join(model_level) or (None if ops else "; ".join(logger.errors) or "(no detail given)")
    return ParseVerdict(status="failed", unsupported_ops=ops, detail=detail[:2000] if detail else None)


def _parse_message(shown: str, verdict: ParseVerdict) -> str:
    lines = []
    for u in verdict.unsupported_ops:
        more = f" and {u.count - len(u.nodes)} more" if u.count > len(u.nodes) else ""
        label = "node" if u.count == 1 else "nodes"
        lines.append(f"{u.op} x{u.count} ({label} {', '.join(u.nodes)}{more})" + (f": {u.detail}" if u.detail else ""))
    if verdict.detail:
        lines.append(verdict.detail)
    what = f"{len(verdict.unsupported_ops)} op type(s) it does not support" if verdict.unsupported_ops else "errors"
    return f"{shown}: TensorRT for RTX {trt_version()} could not parse the model ({what}):\n  " + "\n  ".join(lines)


def trt_version() -> str:
    return str(getattr(trt(), "__version__", "?"))


def _parse(req_path: str, shown: str, logger: Any) -> tuple[Any, Any, Any]:
    """(builder, network, parser) with the model parsed; ModelParseError listing each refused op once otherwise.

    The parser is returned to be kept alive until the build ends: it owns the weights the network points at."""
    t = trt()
    builder = t.Builder(logger)
    network = builder.create_network()
    parser = t.OnnxParser(network, logger)
    if not parser.parse_from_file(str(req_path)):
        verdict = _verdict_from(parser, logger)
        raise ModelParseError(_parse_message(shown, verdict), verdict=verdict, hint=PARSE_HINT)
    return builder, network, parser


def check_parse(onnx_path: str, *, source: str | None = None) -> ParseVerdict:
    """Run TRT-RTX's ONNX parser only (no GPU, no build): status ok, or failed with the refused ops."""
    try:
        _parse(onnx_path, source or onnx_path, make_logger())
    except ModelParseError as e:
        return e.verdict
    return ParseVerdict(status="ok")


def build_engine(req: BuildRequest) -> bytes:
    """Parse the ONNX file and build a serialized engine. Parser and builder errors become EngineBuildError.

    A parser refusal is a ModelParseError (each refused op type once, with its nodes); a builder failure keeps
    TRT-RTX's own messages verbatim (bundler/engines.py matches the known ones to their causes).
    """
    t = trt()
    logger = make_logger()
    builder, network, _parser = _parse(req.onnx_path, req.shown_path, logger)
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
            f"{req.shown_path}: TensorRT for RTX could not build the engine:\n  "
            + "\n  ".join(logger.errors or ["(no detail given)"])
        )
    return bytes(memoryview(plan))
