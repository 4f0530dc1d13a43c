"""Which engines a build makes and building them: weightful multi-SM (works without a GPU), weightless for the local GPU.

Every engine goes through ``runtime_shim.trt.runtime.build_engine``, the one place that calls the TRT-RTX
builder. Engines are built from the normalized model file (initializer names = weight store names), so that
a weightless engine's refit names match the bundle's weights.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_shim.errors import EngineBuildError
from runtime_shim.fsutil import atomic_write, sha256_bytes
from runtime_shim.manifest import Engine, FileRef, Profile, TensorSpec
from runtime_shim.targets import sm_text, trt_rtx_supports
from runtime_shim.trt.build import BuildRequest, ModelParseError, build_engine

from . import __version__
from .config import BuildOptions, host_platform

log = logging.getLogger(__name__)

NO_GPU_NOTE = "no GPU that TensorRT for RTX supports here: weightless engine left to the farm"
Note = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class EnginePlan:
    kind: str  # "weightful" | "weightless"
    platform: str
    compute_capabilities: tuple[int, ...]  # () = TRT-RTX's default targets (weightful only)
    gpu: str | None = None  # the local GPU a weightless engine is built on

    @property
    def label(self) -> str:
        if self.kind == "weightless":
            return f"weightless engine for {self.gpu} (SM {sm_text(self.compute_capabilities[0])})"
        targets = ", ".join(sm_text(s) for s in self.compute_capabilities) or "TRT-RTX default targets"
        return (
            f"weightful engine ({self.platform}; SM {targets})"
            if self.compute_capabilities
            else f"weightful engine ({self.platform}; {targets})"
        )


@dataclass(frozen=True, kw_only=True)
class BuiltEngine:
    engine: Engine
    seconds: float


def trt_rtx_identity() -> tuple[str, str]:
    """(exact TRT-RTX version, CUDA flavour) of the installed builder: engines run only on that version.

    The flavour comes from the same lookup the shim's probe uses, so a bundle built here and a farm job or
    app on this machine never disagree about it.
    """
    import tensorrt_rtx  # the builder needs it anyway; import errors are reported by build_engine's trt()

    from runtime_shim.machine import trt_rtx_install

    return str(tensorrt_rtx.__version__), trt_rtx_install()[1] or "cu13"


def local_weightless_target(probe: Callable[[], Any] | None = None) -> tuple[Any | None, str | None]:
    """(the GPU to build a weightless engine on, None) or (None, why not, in one line).

    Uses ``runtime_shim.machine.probe``; ``probe`` replaces it in tests.
    """
    if probe is None:
        try:
            from runtime_shim.machine import probe as machine_probe
        except ImportError:
            return None, NO_GPU_NOTE
        probe = machine_probe
    try:
        machine = probe()
    except Exception as e:
        log.debug("machine probe failed: %s", e)
        return None, NO_GPU_NOTE
    gpus = tuple(getattr(machine, "gpus", ()) or ())
    supported = [g for g in gpus if trt_rtx_supports(g.sm)]
    if not supported:
        return None, NO_GPU_NOTE
    gpu = supported[0]
    if gpu.index != 0:
        # ComputeCapability.CURRENT builds for the current CUDA device, which is device 0 here.
        return None, (
            f"{NO_GPU_NOTE} (GPU {gpu.index} {gpu.name} is supported but is not the default device; "
            f"set CUDA_VISIBLE_DEVICES={gpu.index} to build for it)"
        )
    driver_problem = getattr(machine, "driver_problem", lambda: None)()
    if driver_problem:
        return None, f"weightless engine not built: {driver_problem}"
    return gpu, None


def plan_engines(
    options: BuildOptions, *, probe: Callable[[], Any] | None = None, note: Note = lambda _: None
) -> list[EnginePlan]:
    """The engines this build makes, in manifest order: weightful per platform, then weightless (if a GPU allows)."""
    plans: list[EnginePlan] = []
    if options.weightful:
        for platform in options.platforms:
            plans.append(EnginePlan(kind="weightful", platform=platform, compute_capabilities=tuple(options.sms or ())))
    if options.weightless:
        gpu, why_not = local_weightless_target(probe)
        if gpu is None:
            note(why_not or NO_GPU_NOTE)
        else:
            plans.append(
                EnginePlan(kind="weightless", platform=host_platform(), compute_capabilities=(gpu.sm,), gpu=gpu.name)
            )
    return plans


def build_engines(
    model_path: Path,
    profiles: Sequence[Profile],
    plans: Sequence[EnginePlan],
    bundle_dir: Path,
    *,
    step: Callable[[str], Any] | None = None,
    source: str | None = None,
    inputs: Sequence[TensorSpec] = (),
) -> list[BuiltEngine]:
    """Build each planned engine from ``model_path`` and write it to ``bundle_dir/engines/<sha256>.engine``.

    ``step(label)`` returns a context manager around each build (the CLI shows progress for slow ones).
    ``source`` (the user's model) is what errors name; ``inputs`` (the model's, with their dim names) lets an
    optimizer failure be matched to its cause.
    """
    version, _ = trt_rtx_identity()
    request_profiles = [p.triples() for p in profiles]
    engines_dir = bundle_dir / "engines"
    engines_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for plan in plans:
        req = BuildRequest(
            onnx_path=str(model_path),
            profiles=request_profiles,
            compute_capabilities=() if plan.kind == "weightless" else plan.compute_capabilities,
            weightless=plan.kind == "weightless",
            windows_target=plan.platform == "windows_amd64" and host_platform() != "windows_amd64",
            source=source,
        )
        t0 = time.monotonic()
        try:
            if step is None:
                plan_bytes = build_engine(req)
            else:
                with step(f"building {plan.label}"):
                    plan_bytes = build_engine(req)
        except ModelParseError:
            raise
        except EngineBuildError as e:
            if req.windows_target:
                raise EngineBuildError(
                    f"{e} (while building {plan.label} on {host_platform()})",
                    hint="TensorRT for RTX may refuse cross-OS builds on a machine without a GPU; build Windows engines on a Windows farm machine",
                ) from None
            if e.hint is None and "could not build the engine" in str(e):
                raise explain_build_failure(e, profiles, inputs, model_path) from None
            raise
        seconds = time.monotonic() - t0
        sha = sha256_bytes(plan_bytes)
        ref = FileRef.for_content("engines", sha, len(plan_bytes))
        atomic_write(bundle_dir / ref.path, plan_bytes)
        # No host names or times here: the same model must give the same manifest bytes.
        built_by = {"tool": f"trtx-bundler {__version__}", "builder": "aot" if plan.kind == "weightful" else "gpu"}
        if plan.gpu:
            built_by["gpu"] = plan.gpu
        if plan.kind == "weightful" and not plan.compute_capabilities:
            built_by["targets"] = "TRT-RTX default (SM 8.0, 8.6, 8.9, 12.0 and later)"
        engine = Engine(
            kind=plan.kind,
            platform=plan.platform,
            compute_capabilities=plan.compute_capabilities,
            trt_rtx_version=version,
            file=ref,
            built_by=built_by,
        )
        log.info("%s: %d bytes in %.2f s", plan.label, len(plan_bytes), seconds)
        out.append(BuiltEngine(engine=engine, seconds=seconds))
    return out


# --------------------------------------------------------------------------- optimizer failures, matched to causes
_SELF_CONSISTENT = re.compile(
    r"Profile (kMIN|kOPT|kMAX) values are not self-consistent.*?name (\S+?) must be equal", re.S
)
# TRT-RTX 1.7: "(seq_len: Input dimensions with this name have different constant values or have contradictory
# IOptimizationProfile kMIN/kMAX constraints. In getBounds ...)"; the name may be missing in other versions.
_CONTRADICTORY = re.compile(
    r"(?:([^\s(]+): )?Input dimensions with this name have different constant values.*?contradictory "
    r"IOptimizationProfile",
    re.S,
)
_SCOPE_ASSERT = re.compile(r"graphScope\.cpp.*ScopeType::kUNDEFINED", re.S)
_FALLBACK_HINT = (
    "--no-weightful still bundles the weights and skeleton (the ONNX Runtime fallback runs them; "
    "a farm machine can try its own GPU build)"
)
_KIND_INDEX = {"kMIN": 0, "kOPT": 1, "kMAX": 2}


def explain_build_failure(
    e: EngineBuildError, profiles: Sequence[Profile], inputs: Sequence[TensorSpec], model_path: Path
) -> EngineBuildError:
    """TRT-RTX's optimizer error with its cause where the message names one; otherwise verbatim, with no guess."""
    msg = str(e)
    if m := _SELF_CONSISTENT.search(msg):
        kind, dim = m.group(1), m.group(2)
        uses = _dim_uses(inputs, dim)
        seen = [_values_at(p, uses, _KIND_INDEX[kind]) for p in profiles]
        bad = next(((i, v) for i, v in enumerate(seen) if len(set(v.values())) > 1), None)
        where = (
            f"profile {bad[0]} gives it the {kind} values " + ", ".join(f"{k}={n}" for k, n in bad[1].items())
            if bad
            else f"its {kind} values differ between inputs"
        )
        users = ", ".join(sorted({name for name, _ in uses})) or "several inputs"
        one_input_twice = len({name for name, _ in uses}) < len(uses)
        placeholder = (
            " If these axes are unrelated (an exporter's placeholder name such as '?'), name them differently in the "
            "model."
            if one_input_twice or not dim.isidentifier()
            else ""
        )
        return EngineBuildError(
            f"{msg}\ncause: the dim {dim!r} is shared by {users}, and {where}; TensorRT for RTX needs one value per name",
            hint=f"give the dim one range shared by every input that uses it: --dim {dim}=MIN:OPT:MAX.{placeholder}",
        )
    if m := _CONTRADICTORY.search(msg):
        reused = _reused_dim_names(inputs, profiles)
        if m.group(1) and m.group(1) in reused:
            reused = {m.group(1): reused[m.group(1)]}
        elif m.group(1):
            reused = {m.group(1): [f"{n}[{a}]" for n, a in _dim_uses(inputs, m.group(1))]} if inputs else {}
        cause = (
            "; ".join(f"the dim name {n!r} is used by {', '.join(w)} with different sizes" for n, w in reused.items())
            if reused
            else "one dim name stands for axes of different sizes"
        )
        return EngineBuildError(
            f"{msg}\ncause: TensorRT for RTX treats equal dim names as one dim: {cause}",
            hint="name unrelated axes differently in the model (exporters often write one placeholder such as '?' "
            f"for all of them), or give the shared name one range with --dim; {_FALLBACK_HINT}",
        )
    if _SCOPE_ASSERT.search(msg) and _has_if_in_if(model_path):
        return EngineBuildError(
            f"{msg}\ncause: seen with If nodes nested in If branches, which this model has",
            hint=f"export the model without nested control flow (If inside If), or pass {_FALLBACK_HINT}",
        )
    return EngineBuildError(msg, hint=f"TensorRT for RTX's own message is shown as it is. Pass {_FALLBACK_HINT}")


def _dim_uses(inputs: Sequence[TensorSpec], dim: str) -> list[tuple[str, int]]:
    return [(t.name, axis) for t in inputs for axis, d in enumerate(t.shape) if d == dim]


def _values_at(profile: Profile, uses: list[tuple[str, int]], which: int) -> dict[str, int]:
    out = {}
    for name, axis in uses:
        r = profile.shapes.get(name)
        if r is not None and axis < len(r.min):
            out[f"{name}[{axis}]"] = (r.min, r.opt, r.max)[which][axis]
    return out


def _reused_dim_names(inputs: Sequence[TensorSpec], profiles: Sequence[Profile]) -> dict[str, list[str]]:
    """Dim names whose axes get different ranges in some profile: name -> ['input[axis]', ...]."""
    names = {d for t in inputs for d in t.shape if isinstance(d, str)}
    out = {}
    for n in sorted(names):
        uses = _dim_uses(inputs, n)
        for p in profiles:
            ranges = {
                f"{name}[{axis}]": (r.min[axis], r.opt[axis], r.max[axis])
                for name, axis in uses
                if (r := p.shapes.get(name)) is not None and axis < len(r.min)
            }
            if len(set(ranges.values())) > 1:
                out[n] = sorted(ranges)
                break
    return out


def _has_if_in_if(model_path: Path) -> bool:
    """Whether the model (read without its weights) has an If node inside an If branch."""
    try:
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as e:  # the hint is optional: a model that cannot be re-read gets the plain message
        log.debug("cannot re-read %s: %s", model_path, e)
        return False

    def walk(g: Any, inside_if: bool) -> bool:
        for node in g.node:
            if node.op_type == "If" and inside_if:
                return True
            for attr in node.attribute:
                subs = [attr.g] if attr.HasField("g") else list(attr.graphs)
                if any(walk(sub, inside_if or node.op_type == "If") for sub in subs):
                    return True
        return False

    return walk(graph, False)


def local_header_check(
    probe: Callable[[], Any] | None = None,
) -> tuple[Callable[[bytes], tuple[str, int]] | None, str | None]:
    """(TRT-RTX's engine-header validity check, None) where a supported GPU is present, else (None, why not)."""
    gpu, why_not = local_weightless_target(probe)
    if gpu is None:
        return None, (why_not or NO_GPU_NOTE).replace(
            "weightless engine left to the farm", "engine headers not checked"
        )
    try:
        from runtime_shim.trt.runtime import TrtRtxRuntime

        return TrtRtxRuntime().engine_validity, None
    except Exception as e:
        return None, f"engine headers not checked: TRT-RTX runtime unavailable ({e})"
