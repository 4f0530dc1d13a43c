"""What fits this machine: the TRT-RTX blocker and the cache key computed once, then engines and caches ranked purely.

Engines: weightless for this SM > weightful covering this SM > build here from the skeleton > ONNX Runtime.
Caches: the user's own cache for this key > bundled exact key > bundled cache TRT-RTX may still accept > none.
Every candidate carries a reason in words, so that the report and ``doctor`` can say why it was taken or passed over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache_key import MISMATCH, cache_key_for, classify_cache, model_id
from .errors import MachineError
from .machine import Gpu, Machine, sm_text, trt_rtx_supports, unsupported_reason
from .manifest import CacheKey, Engine, Manifest, RuntimeCache, read_manifest_sha256
from .user_cache import UserCache

# What an engine built with no explicit compute capability covers: TRT-RTX's default is "Ampere and later";
# Turing (7.5) must be asked for explicitly.
DEFAULT_ENGINE_SMS = frozenset({80, 86, 89, 120, 121})

ENGINE_KINDS_RANK = {"weightless": 0, "weightful": 1, "build": 2, "fallback": 3}
CACHE_KINDS_RANK = {"user_cache": 0, "bundled_exact": 1, "bundled_compatible": 2, "none": 3}


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One candidate: ``kind`` is weightless|weightful|build|fallback for engines, user_cache|bundled_*|none for caches."""

    kind: str
    index: int | None  # position in manifest.engines / manifest.runtime_caches; None for build/fallback/user/none
    candidate: Engine | RuntimeCache | None
    viable: bool  # could be used on this machine
    taken: bool  # the first viable one in rank order
    reason: str  # why it was taken or passed over, in words

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "index": self.index,
            "viable": self.viable,
            "taken": self.taken,
            "reason": self.reason,
        }
        if isinstance(self.candidate, Engine):
            d["file"] = self.candidate.file.path
            d["compute_capabilities"] = list(self.candidate.compute_capabilities)
        elif isinstance(self.candidate, RuntimeCache):
            d["file"] = self.candidate.file.path
            d["key"] = self.candidate.key.to_dict()
        return d


@dataclass(frozen=True, kw_only=True)
class Situation:
    """This machine as selection sees it, worked out once: the GPU, why TRT-RTX cannot run, the runtime-cache key."""

    machine: Machine
    gpu: Gpu | None
    blocker: str | None  # why TRT-RTX cannot run here at all, before looking at engines; None: it can
    key: CacheKey | None  # this machine's runtime-cache key; None where TRT-RTX cannot run or the key is unknown
    key_problem: str | None = None  # why no key could be formed although TRT-RTX can run

    @property
    def why_not(self) -> str | None:
        """Why no TRT-RTX session (and so no runtime cache) can be used here, or None."""
        return self.blocker or self.key_problem


def assess(machine: Machine, gpu: Gpu | None) -> Situation:
    """The TRT-RTX blocker and the runtime-cache key of ``gpu`` on ``machine``, each computed here and only here."""
    blocker = _trt_blocker(machine, gpu)
    key, key_problem = None, None
    if blocker is None and gpu is not None:
        try:
            key = cache_key_for(machine, gpu)
        except MachineError as e:
            key_problem = str(e)
    return Situation(machine=machine, gpu=gpu, blocker=blocker, key=key, key_problem=key_problem)


def _trt_blocker(machine: Machine, gpu: Gpu | None) -> str | None:
    """Why TRT-RTX cannot run on this machine at all (before looking at engines), or None."""
    if machine.trt_rtx_version is None:
        return "tensorrt_rtx is not installed (pip install tensorrt-rtx)"
    if gpu is None:
        return machine.problem or "no NVIDIA GPU was found"
    if (why := unsupported_reason(gpu)) is not None:
        return why
    if (why := machine.driver_problem()) is not None:
        return why
    if machine.os not in ("linux", "windows"):
        return f"TensorRT for RTX runs on Linux and Windows, not {machine.os}"
    return None


def pick_gpu(machine: Machine, device: int | None = None) -> Gpu | None:
    """The GPU to use: the one asked for, else the first TRT-RTX supports, else the first (so reports name it)."""
    if not machine.gpus:
        return None
    if device is not None:
        for g in machine.gpus:
            if g.index == device:
                return g
        return None
    return next((g for g in machine.gpus if trt_rtx_supports(g.sm)), machine.gpus[0])


def rank_engines(manifest: Manifest, here: Situation) -> list[Choice]:
    """Every engine of the bundle, plus 'build here' and 'fallback', ranked; the first viable one is taken."""
    machine, gpu, blocker = here.machine, here.gpu, here.blocker
    rows: list[tuple[int, int, Choice]] = []
    for i, engine in enumerate(manifest.engines):
        why = blocker or _engine_mismatch(engine, machine, gpu)  # type: ignore[arg-type]
        good = (
            (
                f"weightless engine built for SM {sm_text(gpu.sm)}: refit from the weight store"
                if engine.kind == "weightless"
                else f"weightful engine covering SM {sm_text(gpu.sm)}"
            )
            if gpu and why is None
            else ""
        )
        rows.append(
            (
                ENGINE_KINDS_RANK[engine.kind],
                i,
                Choice(
                    kind=engine.kind, index=i, candidate=engine, viable=why is None, taken=False, reason=why or good
                ),
            )
        )
    unparsable = manifest.trt_rtx.cannot_parse
    no_build = (
        f"TensorRT for RTX {manifest.trt_rtx.version} could not parse this model when it was bundled "
        f"({unparsable.summary()}): no engine can be built from it"
        if unparsable is not None
        else None
    )
    rows.append(
        (
            2,
            0,
            Choice(
                kind="build",
                index=None,
                candidate=None,
                viable=blocker is None and no_build is None,
                taken=False,
                reason=no_build  # the bundle's own verdict: true on every machine, so it comes first
                or blocker
                or "build a weightless engine for this GPU from the skeleton (CURRENT), once; "
                "it is kept in the user cache dir",
            ),
        )
    )
    rows.append(
        (
            3,
            0,
            Choice(
                kind="fallback",
                index=None,
                candidate=None,
                viable=True,
                taken=False,
                reason="ONNX Runtime on the CPU, from the skeleton and the weight store",
            ),
        )
    )
    return _take_first(rows)


def _engine_mismatch(engine: Engine, machine: Machine, gpu: Gpu) -> str | None:
    if engine.trt_rtx_version != machine.trt_rtx_version:
        return (
            f"built with TensorRT for RTX {engine.trt_rtx_version}, but {machine.trt_rtx_version} is installed "
            f"(engines run only on the exact version that built them)"
        )
    if engine.platform != machine.platform:
        return f"built for {engine.platform}, this machine is {machine.platform}"
    if engine.kind == "weightless":
        if tuple(engine.compute_capabilities) != (gpu.sm,):
            built = ", ".join(sm_text(s) for s in engine.compute_capabilities) or "?"
            return f"weightless engine for SM {built}, this GPU is SM {sm_text(gpu.sm)}"
        return None
    covered = set(engine.compute_capabilities) or DEFAULT_ENGINE_SMS
    if gpu.sm not in covered:
        return f"weightful engine for SM {', '.join(sm_text(s) for s in sorted(covered))}, which does not cover this GPU's SM {sm_text(gpu.sm)}"
    return None


def rank_caches(manifest: Manifest, here: Situation, user_cache_available: bool) -> list[Choice]:
    """The runtime caches worth trying, ranked; the first viable one is taken, the others may be tried if it is rejected."""
    key, blocker = here.key, here.why_not
    rows: list[tuple[int, int, Choice]] = []
    if blocker is not None:
        blocker = f"no TRT-RTX session on this machine ({blocker})"
    rows.append(
        (
            0,
            0,
            Choice(
                kind="user_cache",
                index=None,
                candidate=None,
                viable=blocker is None and user_cache_available,
                taken=False,
                reason=blocker
                or (
                    "your own cache for this GPU, driver and TRT-RTX, saved by an earlier run"
                    if user_cache_available
                    else "no cache saved yet for this GPU and driver"
                ),
            ),
        )
    )
    for i, cache in enumerate(manifest.runtime_caches):
        if key is None:
            rows.append(
                (
                    9,
                    i,
                    Choice(
                        kind=MISMATCH,
                        index=i,
                        candidate=cache,
                        viable=False,
                        taken=False,
                        reason=blocker or "",
                    ),
                )
            )
            continue
        kind, why = classify_cache(cache.key, key)
        rank = CACHE_KINDS_RANK.get(kind, 9)
        # Among equals, the newest cache holds the most kernels.
        rows.append(
            (
                rank,
                -(cache.created or 0) * 1000 + i,
                Choice(kind=kind, index=i, candidate=cache, viable=kind != MISMATCH, taken=False, reason=why),
            )
        )
    rows.append(
        (
            3,
            0,
            Choice(
                kind="none",
                index=None,
                candidate=None,
                viable=True,
                taken=False,
                reason="no runtime cache: kernels are compiled on first use (JIT) and saved to the user cache",
            ),
        )
    )
    return _take_first(rows)


def _take_first(rows: list[tuple[int, int, Choice]]) -> list[Choice]:
    ordered = [c for _, _, c in sorted(rows, key=lambda r: (not r[2].viable, r[0], r[1]))]
    out, taken = [], False
    for c in ordered:
        if c.viable and not taken:
            taken = True
            out.append(
                Choice(kind=c.kind, index=c.index, candidate=c.candidate, viable=True, taken=True, reason=c.reason)
            )
        elif c.viable:
            out.append(
                Choice(
                    kind=c.kind,
                    index=c.index,
                    candidate=c.candidate,
                    viable=True,
                    taken=False,
                    reason=f"usable, ranked below the one taken: {c.reason}",
                )
            )
        else:
            out.append(c)
    return out


# ----------------------------------------------------------------------------------- the plan of a load
@dataclass(frozen=True)
class Plan:
    """What would run here: the manifest, the situation and the ranked choices (used by load() and by doctor)."""

    manifest: Manifest
    warnings: list[str]
    here: Situation
    engines: list[Choice]
    caches: list[Choice]
    manifest_sha256: str = ""  # of the manifest bytes parsed

    @property
    def machine(self) -> Machine:
        return self.here.machine

    @property
    def gpu(self) -> Gpu | None:
        return self.here.gpu

    @property
    def key(self) -> CacheKey | None:
        return self.here.key

    @property
    def blocker(self) -> str | None:
        """Why TRT-RTX cannot run (or cannot use a runtime cache) here, or None."""
        return self.here.why_not


def plan(
    bundle_path: str | Path,
    user_cache: UserCache,
    *,
    machine: Machine,
    device: int | None = None,
    model: str | None = None,
) -> Plan:
    """Read and validate the manifest, then rank ``model``'s engines and caches for ``machine`` (a probe) and its GPU.

    ``model`` may be left out for a one-model bundle; else ModelChoiceError lists the names (manifest.py).
    """
    manifest, warnings, manifest_sha256 = read_manifest_sha256(bundle_path, model)
    return plan_for(manifest, warnings, manifest_sha256, user_cache, machine=machine, device=device)


def plan_for(
    manifest: Manifest,
    warnings: list[str],
    manifest_sha256: str,
    user_cache: UserCache,
    *,
    machine: Machine,
    device: int | None = None,
) -> Plan:
    """plan() for one model's manifest already read (``BundleManifest.view``: from a directory, or in place from an
    archive). Its user-cache entries are that model's own (cache_key.model_id: its name and its skeleton's hash)."""
    here = assess(machine, pick_gpu(machine, device))
    have_user = here.key is not None and user_cache.has_runtime_cache(model_id(manifest), here.key)
    return Plan(
        manifest,
        warnings,
        here,
        rank_engines(manifest, here),
        rank_caches(manifest, here, have_user),
        manifest_sha256=manifest_sha256,
    )
