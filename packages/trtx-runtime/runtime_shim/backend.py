"""The backend a plan runs on: the first engine TRT-RTX opens, else ONNX Runtime where the app allows it.

Each engine tried is verified (or built here), offered the runtime caches in rank order and refit; what was tried and
why it failed goes into the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache_key import built_engine_name, model_id
from .errors import BackendUnavailableError, BundleError, MachineError
from .fallback import OrtSession, model_on_disk, read_verified
from .manifest import Engine
from .report import Report
from .select import Choice, Plan
from .user_cache import UserCache

if TYPE_CHECKING:  # pragma: no cover
    from .trt.runtime import TrtRuntime
    from .trt.session import TrtSession

log = logging.getLogger(__name__)

FALLBACKS = ("onnxruntime", "error")
# Both hash every frame on every load: "once" named a stamp that skipped the hashing on later loads, retired because
# a file's identity cannot promise its bytes (docs/WEIGHT_STORE.md, "Verification"); it is still accepted.
VERIFY_WEIGHTS = ("always", "once")

# Opens TRT-RTX on the CUDA device of that index (one per engine tried): TrtRtxRuntime, or a fake in tests.
TrtRuntimeFactory = Callable[[int], "TrtRuntime"]


def real_trt_runtime(device: int) -> TrtRuntime:
    """TensorRT for RTX on CUDA device ``device`` (tensorrt_rtx and cuda-python are imported here, on first use)."""
    from .trt.runtime import TrtRtxRuntime

    return TrtRtxRuntime(device)


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How load() opens a bundle; checked on creation (BundleError naming the argument)."""

    specialization: str = "lazy"
    cuda_graphs: bool = True
    fallback: str = "onnxruntime"
    weights_on_device: bool | None = None
    verify_weights: str = "always"

    def __post_init__(self) -> None:
        from .trt.runtime import SPECIALIZATIONS

        if self.fallback not in FALLBACKS:
            raise BundleError(f"fallback: expected one of {', '.join(FALLBACKS)}, got {self.fallback!r}")
        if self.verify_weights not in VERIFY_WEIGHTS:
            raise BundleError(f"verify_weights: expected 'once' or 'always', got {self.verify_weights!r}")
        if self.specialization not in SPECIALIZATIONS:
            raise BundleError(
                f"specialization: expected one of {', '.join(SPECIALIZATIONS)}, got {self.specialization!r}"
            )


def open_backend(
    p: Plan,
    bundle_dir: Path,
    user_cache: UserCache,
    report: Report,
    options: LoadOptions,
    trt_runtime: TrtRuntimeFactory,
) -> tuple[Any, Engine | None]:
    """(the backend session, the bundle's Engine it runs or None); fills in the report's backend, engine and why."""
    failures: list[str] = []
    for choice in p.engines:
        if not choice.viable or choice.kind == "fallback":
            continue
        try:
            impl = open_trt(p, choice, bundle_dir, user_cache, report, options, trt_runtime)
        except MachineError as e:
            failures.append(
                f"{choice.kind} engine {choice.candidate.file.path if choice.candidate else ''}: {e}".replace("  ", " ")
            )
            report.warnings.append(f"TensorRT for RTX could not use the {choice.kind} engine: {e}")
            log.warning("%s", report.warnings[-1])
            continue
        report.backend = "tensorrt_rtx"
        return impl, choice.candidate if isinstance(choice.candidate, Engine) else None
    passed = [f"{c.kind} engine [{c.index}]: {c.reason}" for c in p.engines if c.index is not None and not c.viable]
    report.why_not_trt = (
        p.blocker or "; ".join(passed + failures) or "the bundle has no engine and none could be built here"
    )
    if options.fallback == "error":
        raise BackendUnavailableError(
            f"{bundle_dir}: TensorRT for RTX cannot run this bundle here: {report.why_not_trt}",
            hint="run 'trtx-bundle doctor BUNDLE' for details, or load with fallback='onnxruntime'",
        )
    ort = OrtSession(p.manifest, bundle_dir, user_cache)
    report.backend = "onnxruntime"
    report.timings.update(ort.timings)
    return ort, None


def open_trt(
    p: Plan,
    choice: Choice,
    bundle_dir: Path,
    user_cache: UserCache,
    report: Report,
    options: LoadOptions,
    trt_runtime: TrtRuntimeFactory,
) -> TrtSession:
    """One engine on TRT-RTX: its bytes verified (or built here), the caches in rank order, the weights refit."""
    from .refit import StoreWeights
    from .trt.session import TrtSession

    t0 = time.perf_counter()
    if isinstance(choice.candidate, Engine):
        where = f"engines[{choice.index}].file"
        plan_bytes = read_verified(bundle_dir, choice.candidate.file, where)
        report.engine = {"kind": choice.kind, "file": choice.candidate.file.path, "index": choice.index}
    else:
        where, plan_bytes = build_here(p, bundle_dir, user_cache)
        report.engine = {"kind": "built_here", "file": where}
    report.timings["engine_read_s"] = time.perf_counter() - t0
    blobs, names = _caches_in_rank_order(p, bundle_dir, user_cache)
    weights = StoreWeights(p.manifest, bundle_dir) if choice.kind in ("weightless", "build") else None
    try:
        session = TrtSession(
            trt_runtime(p.gpu.index),  # type: ignore[union-attr]  # an engine is viable only with a GPU
            plan_bytes,
            weights=weights,
            specialization=options.specialization,
            cuda_graphs=options.cuda_graphs,
            caches=blobs,
            weights_on_device=options.weights_on_device,
            source=where,
        )
    finally:
        if weights is not None:
            weights.close()
    report.timings.update(session.timings)
    if session.refit_from:
        report.engine["weights_from"] = session.refit_from  # "device" (gpu/upload.py pipeline) or "host"
        report.engine["weights_check"] = weights.check if weights is not None else None
        if weights is not None and weights.decoded_on:
            report.engine["weights_decoded_on"] = weights.decoded_on + (
                f" ({weights.decode_why})" if weights.decode_why else ""
            )
    report.warnings.extend(session.notes)
    if session.cache_loaded is not None:
        report.runtime_cache = names[session.cache_loaded]
    elif blobs:
        report.runtime_cache = f"none: TRT-RTX rejected all {len(blobs)} candidate(s); kernels compile on first use"
        log.info("%s", report.runtime_cache)
    return session


def _caches_in_rank_order(p: Plan, bundle_dir: Path, user_cache: UserCache) -> tuple[list[bytes], list[str]]:
    # TRT-RTX takes the first it accepts. Each is verified before TRT-RTX sees its bytes.
    blobs, names = [], []
    for c in p.caches:
        if not c.viable or c.kind == "none":
            continue
        if c.kind == "user_cache" and p.key is not None:
            data = user_cache.read_runtime_cache(model_id(p.manifest), p.key)
            if data is not None:
                blobs.append(data)
                names.append(f"user cache {user_cache.runtime_cache_path(model_id(p.manifest), p.key)}")
        elif c.candidate is not None:
            blobs.append(read_verified(bundle_dir, c.candidate.file, f"runtime_caches[{c.index}].file"))
            names.append(f"bundled runtime_caches[{c.index}] ({c.kind.replace('bundled_', '')} key)")
    return blobs, names


def build_here(p: Plan, bundle_dir: Path, user_cache: UserCache) -> tuple[str, bytes]:
    """A weightless engine for this GPU, built from the skeleton once and kept in the user cache."""
    from .trt.build import BuildRequest, build_engine

    name = built_engine_name(p.manifest, p.gpu.sm, p.machine.trt_rtx_version)  # type: ignore[union-attr]  # viable: a GPU
    path = user_cache.engine_path(name)
    kept = user_cache.read_engine(name)
    if kept is not None:
        return str(path), kept
    with model_on_disk(p.manifest, bundle_dir, user_cache) as onnx_path:  # TRT-RTX's parser reads files
        profiles = [prof.triples() for prof in p.manifest.profiles]
        try:
            data = build_engine(BuildRequest(onnx_path=str(onnx_path), profiles=profiles, weightless=True))
        except BundleError as e:
            raise MachineError(f"building an engine for this GPU failed: {e}") from None
    user_cache.save_engine(name, data)
    return str(path), data
