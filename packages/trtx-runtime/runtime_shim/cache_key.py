"""Runtime-cache keys, in one place: this machine's key, whether a cache made under one key fits another, file names.

TRT-RTX has no fingerprint API (DESIGN.md, fact 4): a runtime cache is accepted only on the same GPU SKU, OS family,
exact TRT-RTX version, CUDA flavour, CiG state and a driver of the same major, no older than the one that made it.
The manifest records that key; this module forms it from a probe and compares two of them.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from .errors import MachineError
from .fsutil import sha256_bytes
from .manifest import CacheKey, Manifest
from .targets import sm_text

if TYPE_CHECKING:  # pragma: no cover
    from .machine import Gpu, Machine

# What classify_cache says about a bundled cache.
EXACT, COMPATIBLE, MISMATCH = "bundled_exact", "bundled_compatible", "bundled_mismatch"


def cache_key_for(machine: Machine, gpu: Gpu) -> CacheKey:
    """The runtime-cache key of this machine and GPU: what TRT-RTX compares before it accepts a cache."""
    flavour, version = machine.cuda_flavour, machine.trt_rtx_version
    missing = [
        name
        for name, v in (
            ("driver version", machine.driver_version),
            ("CUDA flavour", machine.cuda_flavour),
            ("TRT-RTX version", machine.trt_rtx_version),
        )
        if not v
    ]
    if missing or not flavour or not version or machine.os not in ("linux", "windows"):
        raise MachineError(
            f"cannot form a runtime-cache key for GPU {gpu.index} ({gpu.name}): "
            + (f"unknown {', '.join(missing)}" if missing else f"OS {machine.os!r} is not one TRT-RTX runs on"),
            hint="run 'trtx-bundle doctor' to see what was probed",
        )
    return CacheKey(
        os=machine.os,
        gpu_name=gpu.name,
        pci_device_id=gpu.pci_device_id,
        sm=gpu.sm,
        driver_version=_short_driver(machine.driver_version),
        cuda_flavour=flavour,
        trt_rtx_version=version,
        cig=machine.cig,
    )


def _short_driver(version: str | None) -> str:
    # CacheKey wants digits and dots only; Linux drivers read "580.95.05", Windows "581.57".
    m = re.match(r"^\d+(\.\d+)*", version or "")
    return m.group(0) if m else "0"


def classify_cache(made: CacheKey, here: CacheKey) -> tuple[str, str]:
    """('bundled_exact' | 'bundled_compatible' | 'bundled_mismatch', reason) for a cache made under ``made`` used under ``here``."""
    problems = []
    if made.os != here.os:
        problems.append(f"made on {made.os}, this machine runs {here.os}")
    if made.pci_device_id != here.pci_device_id or made.sm != here.sm:
        problems.append(
            f"made on {made.gpu_name} (device 0x{made.pci_device_id:04x}, SM {sm_text(made.sm)}), this GPU is "
            f"{here.gpu_name} (device 0x{here.pci_device_id:04x}, SM {sm_text(here.sm)}); caches are tied to the GPU model"
        )
    if made.trt_rtx_version != here.trt_rtx_version:
        problems.append(f"made with TensorRT for RTX {made.trt_rtx_version}, {here.trt_rtx_version} is installed")
    if made.cuda_flavour != here.cuda_flavour:
        problems.append(f"made with the {made.cuda_flavour} build of TRT-RTX, this one is {here.cuda_flavour}")
    if made.cig != here.cig:
        problems.append(
            f"made with CUDA-in-Graphics {'on' if made.cig else 'off'}, here it is {'on' if here.cig else 'off'}"
        )
    dm, dh = _version(made.driver_version), _version(here.driver_version)
    if dm[:1] != dh[:1]:
        problems.append(
            f"made with driver {made.driver_version}, this machine has {here.driver_version} (another major version)"
        )
    elif dh < dm:
        problems.append(
            f"made with driver {made.driver_version}, this machine has the older {here.driver_version} "
            f"(a cache needs the same or a newer driver)"
        )
    if problems:
        return MISMATCH, "; ".join(problems)
    if dm == dh:
        return (
            EXACT,
            f"bundled cache made on this GPU model, driver {made.driver_version} and TRT-RTX {made.trt_rtx_version}",
        )
    return COMPATIBLE, (
        f"bundled cache made with driver {made.driver_version}; this machine has the newer "
        f"{here.driver_version} of the same major, which TRT-RTX may still accept"
    )


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def serves_gpus_of(key: CacheKey, *, os: str, sm: int, trt_rtx_version: str, cuda_flavour: str) -> bool:
    """Whether a cache made under ``key`` is for GPUs of this SM on this OS, TRT-RTX version and flavour (any SKU)."""
    return key.sm == sm and key.os == os and key.trt_rtx_version == trt_rtx_version and key.cuda_flavour == cuda_flavour


def key_text(key: CacheKey) -> str:
    """A key in words, for reports: GPU, device id, SM, OS and driver."""
    return f"{key.gpu_name} (0x{key.pci_device_id:04x}, SM {sm_text(key.sm)}) {key.os} driver {key.driver_version}"


# ----------------------------------------------------------------------------------- user-cache names
def key_id(key: CacheKey) -> str:
    """A short, stable file name for a cache key (the key itself is stored inside the file)."""
    return sha256_bytes(json.dumps(key.to_dict(), sort_keys=True).encode())[:20]


def model_id(manifest: Manifest) -> str:
    """The user-cache folder of a bundle's runtime caches and engines built here."""
    # Kernels depend on the graph, not on weight values: the skeleton's hash names the cache family.
    name = manifest.model.name
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "model"
    if slug != name:  # cut or rewritten: two model names of one bundle that read alike must not share entries
        slug = f"{slug[:31]}+{sha256_bytes(name.encode())[:16]}"  # "+" is in no plain slug
    return f"{slug}-{manifest.skeleton.file.sha256[:16]}"


def built_engine_name(manifest: Manifest, sm: int, trt_rtx_version: str | None) -> str:
    """The user-cache name of the engine built on this machine for a GPU of ``sm``."""
    return f"{model_id(manifest)}-sm{sm}-{trt_rtx_version}"
