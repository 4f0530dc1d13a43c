"""The coverage matrix of a bundle: per model, platform and SM, which engine a user gets and which GPUs have a runtime cache.

The engine column comes from the shim's own ranking (runtime_shim.select) run for a stand-in machine of
each SM, so what ``inspect`` promises is what ``load`` does. Each model of a bundle has its own engines and
caches, so its own matrix: ``coverage`` takes one model's view, ``coverage_by_model`` does every model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime_shim.cache_key import serves_gpus_of
from runtime_shim.machine import Gpu, Machine, sm_text
from runtime_shim.manifest import PLATFORMS, BundleManifest, Manifest, RuntimeCache
from runtime_shim.select import assess, rank_engines
from runtime_shim.targets import SUPPORTED_SMS

_OS_OF = {"linux_x86_64": "linux", "windows_amd64": "windows"}
ENGINE_WORDS = {
    "weightless": "weightless engine for this SM (refit from the weight store)",
    "weightful": "weightful engine covering this SM",
    "build": "none bundled: built on the user's GPU from the skeleton on first run (slow once), then kept in the user cache",
    "fallback": "ONNX Runtime fallback",
}
NO_CACHE = (
    "no pregenerated cache: kernels JIT-compile on first use of each shape (seconds), then are kept in the user cache"
)
UNSUPPORTED = (
    "GPUs TensorRT for RTX does not support (SM 9.0 Hopper, SM 10.x, older than SM 7.5) and machines without an "
    "NVIDIA GPU or with an old driver: the ONNX Runtime fallback where the app allows it, otherwise a clear error"
)


@dataclass(frozen=True, kw_only=True)
class CoverageRow:
    platform: str
    sm: int
    engine: str  # weightless | weightful | build | fallback (the shim's choice for a GPU of this SM)
    engine_sha256: str | None
    caches: tuple[RuntimeCache, ...]  # pregenerated caches for GPUs of this SM on this OS

    def to_dict(self) -> dict[str, Any]:
        return {
            "platform": self.platform,
            "sm": self.sm,
            "engine": self.engine,
            "engine_sha256": self.engine_sha256,
            "engine_words": ENGINE_WORDS[self.engine],
            "caches": [_cache_dict(c) for c in self.caches],
            "uncached_gpus": NO_CACHE,
        }


@dataclass(frozen=True, kw_only=True)
class Coverage:
    trt_rtx_version: str
    cuda_flavour: str
    rows: tuple[CoverageRow, ...]
    other_caches: tuple[RuntimeCache, ...]  # keys no row shows (another TRT-RTX version, an SM outside the targets)
    cannot_parse: str | None = None  # the ops TRT-RTX's parser refused when the model was bundled, in one line
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "trt_rtx_version": self.trt_rtx_version,
            "cuda_flavour": self.cuda_flavour,
            "trt_rtx_cannot_parse": self.cannot_parse,
            "rows": [r.to_dict() for r in self.rows],
            "other_caches": [_cache_dict(c) for c in self.other_caches],
            "unsupported_gpus": UNSUPPORTED,
        }


def coverage(manifest: Manifest) -> Coverage:
    version, flavour = manifest.trt_rtx.version, manifest.trt_rtx.cuda_flavour
    used_platforms = {e.platform for e in manifest.engines} | {
        p for p, os_name in _OS_OF.items() for c in manifest.runtime_caches if c.key.os == os_name
    }
    platforms = [p for p in PLATFORMS if p in used_platforms] or list(PLATFORMS)
    rows: list[CoverageRow] = []
    shown: set[int] = set()
    for platform in platforms:
        for sm in SUPPORTED_SMS:
            gpu = Gpu(index=0, name=f"any SM {sm_text(sm)} GPU", pci_device_id=0, uuid="", sm=sm, total_memory=0)
            machine = Machine(
                os=_OS_OF[platform],
                platform=platform,
                cpu_arch="x86_64",
                python="",
                trt_rtx_version=version,
                cuda_flavour=flavour,
                driver_version=None,
                driver_cuda_version=None,
                gpus=(gpu,),
            )
            taken = next(c for c in rank_engines(manifest, assess(machine, gpu)) if c.taken)
            caches = tuple(
                c
                for c in manifest.runtime_caches
                if serves_gpus_of(c.key, os=_OS_OF[platform], sm=sm, trt_rtx_version=version, cuda_flavour=flavour)
            )
            shown.update(id(c) for c in caches)
            sha = taken.candidate.file.sha256 if taken.candidate is not None else None
            rows.append(CoverageRow(platform=platform, sm=sm, engine=taken.kind, engine_sha256=sha, caches=caches))
    others = tuple(c for c in manifest.runtime_caches if id(c) not in shown)
    refused = manifest.trt_rtx.cannot_parse
    return Coverage(
        trt_rtx_version=version,
        cuda_flavour=flavour,
        rows=tuple(rows),
        other_caches=others,
        cannot_parse=refused.summary() if refused is not None else None,
        model=manifest.model.name,
    )


def coverage_by_model(bundle: BundleManifest) -> dict[str, Coverage]:
    """Every model's matrix, by name, in the bundle's order."""
    return {view.model.name: coverage(view) for view in bundle.views()}


def _cache_dict(c: RuntimeCache) -> dict[str, Any]:
    return {**c.key.to_dict(), "file": c.file.path, "engines": list(c.engines), "created": c.created}


def render(d: Mapping[str, Any], *, with_model: bool = False) -> list[str]:
    """The matrix as text lines for `inspect`, from ``Coverage.to_dict()`` (what `inspect --json` prints).

    ``with_model`` (a bundle of several models): the heading and notes name the model.
    """
    model = d.get("model") if with_model else None
    of = f" of model {model}" if model else ""
    lines = [
        f"coverage{of} (TensorRT for RTX {d['trt_rtx_version']}, {d['cuda_flavour']}): what a user's GPU gets",
        f"  {'platform':<14} {'SM':<5} {'engine':<11} runtime caches (GPU, device id, driver >=)",
    ]
    for r in d["rows"]:
        caches = (
            "; ".join(
                f"{c['gpu_name']} 0x{c['pci_device_id']:04x} {c['driver_version']}" + (" CiG" if c["cig"] else "")
                for c in r["caches"]
            )
            or "-"
        )
        engine = "build here" if r["engine"] == "build" else r["engine"]
        lines.append(f"  {r['platform']:<14} {sm_text(r['sm']):<5} {engine:<11} {caches}")
    if d.get("trt_rtx_cannot_parse"):
        lines.append(
            f"  TensorRT for RTX {d['trt_rtx_version']} could not parse {f'model {model}' if model else 'this model'} when it was bundled "
            f"({d['trt_rtx_cannot_parse']}): no GPU builds an engine from it; the ONNX Runtime fallback runs it"
        )
    if any(r["engine"] == "build" for r in d["rows"]):
        lines.append("  engine 'build here': " + ENGINE_WORDS["build"])
    lines.append("  a GPU model, OS or driver major not listed: " + NO_CACHE)
    for c in d["other_caches"]:
        lines.append(
            f"  cache no row uses (another TRT-RTX version or SM): {c['gpu_name']} SM {sm_text(c['sm'])} {c['os']} "
            f"driver {c['driver_version']} TRT-RTX {c['trt_rtx_version']} {c['cuda_flavour']}"
        )
    lines.append("  " + UNSUPPORTED)
    return lines
