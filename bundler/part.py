"""The farm part format: part.json (its own schema_version) and the part directory, written all at once.

A part is a directory laid out like a bundle (``engines/<sha256>.engine``, ``caches/<sha256>.cache``) plus
``part.json``, which names the bundle it was made for (sha256 of that bundle's manifest.json, and of its
model, weights and profiles), the full runtime-cache key, the warm-up runs, timings and the tool version:

    {"kind": "trtx-bundler-part", "schema_version": 1,
     "bundle": {"manifest_sha256": ..., "base_sha256": ..., "model": "mlp"},
     "engine": <a manifest.json engines[] entry> | null,        # null: the bundle already had one for this SM
     "runtime_cache": <a manifest.json runtime_caches[] entry>, # key: os, gpu_name, pci_device_id, sm,
                                                                #   driver_version, cuda_flavour, trt_rtx_version, cig
     "warmup": [{"profile": 0, "shapes": {"x": [4, 64]}, "first_run_s": 0.8, "rounds": 2}],
     "timings": {"probe_s": ..., "build_s": ..., "load_s": ..., "warmup_s": ..., "serialize_s": ..., "total_s": ...},
     "machine": {"host": ..., "gpu_uuid": ..., "gpu_index": "0", "driver_version": "580.95.05", "platform": ...},
     "tool": {"tool": "trtx-bundler", "version": "0.1.0"}, "created": <unix seconds>}

A newer schema_version is refused (merge with the trtx-bundler release the farm runs); unknown keys are warned
about and dropped, as in manifest.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_shim import __version__
from runtime_shim.errors import ManifestError
from runtime_shim.fsutil import atomic_write, sha256_bytes
from runtime_shim.manifest import Engine, FileRef, Manifest, RuntimeCache, Shape
from runtime_shim.schema import Reader, load_json_file, sha256_hex

PART_SCHEMA_VERSION = 1
PART_KIND = "trtx-bundler-part"
PART_MANIFEST_NAME = "part.json"


# --------------------------------------------------------------------------- part manifest
@dataclass(frozen=True, kw_only=True)
class WarmupRun:
    """One warm-up: a shape for every input, run under one optimization profile."""

    profile: int
    shapes: Mapping[str, Shape]
    first_run_s: float | None = None  # EAGER compile + run: what a user without this cache would wait
    rounds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "shapes": {k: list(v) for k, v in sorted(self.shapes.items())},
            "first_run_s": self.first_run_s,
            "rounds": self.rounds,
        }

    @staticmethod
    def _parse(r: Reader) -> WarmupRun:
        shapes = r.get("shapes", Mapping)
        return WarmupRun(
            profile=r.get("profile", int),
            shapes={k: tuple(v) for k, v in sorted(shapes.items())},
            first_run_s=r.get("first_run_s", (int, float), default=None),
            rounds=r.get("rounds", int, default=0),
        )


@dataclass(frozen=True, kw_only=True)
class Part:
    """part.json: what one farm job made, and for which bundle."""

    bundle_manifest_sha256: str  # sha256 of the manifest.json bytes the job read
    bundle_base_sha256: str  # sha256 of that manifest without engines/caches: same model, weights, skeleton, profiles
    model: str
    runtime_cache: RuntimeCache  # key, file, and the engine it was made with
    engine: Engine | None = None  # the weightless engine this job built; None when the bundle already had one
    warmup: tuple[WarmupRun, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)  # seconds: build, load, warmup, serialize, total
    machine: Mapping[str, str] = field(default_factory=dict)  # informational: host, GPU UUID, full driver version
    tool_version: str = __version__
    created: int = 0  # unix seconds; ``merge`` keeps the newest cache per key by default
    schema_version: int = PART_SCHEMA_VERSION

    def files(self) -> list[tuple[str, FileRef]]:
        out = [("runtime_cache.file", self.runtime_cache.file)]
        if self.engine is not None:
            out.insert(0, ("engine.file", self.engine.file))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": PART_KIND,
            "schema_version": self.schema_version,
            "bundle": {
                "manifest_sha256": self.bundle_manifest_sha256,
                "base_sha256": self.bundle_base_sha256,
                "model": self.model,
            },
            "engine": None if self.engine is None else self.engine.to_dict(),
            "runtime_cache": self.runtime_cache.to_dict(),
            "warmup": [w.to_dict() for w in self.warmup],
            "timings": {k: round(v, 6) for k, v in sorted(self.timings.items())},
            "machine": dict(sorted(self.machine.items())),
            "tool": {"tool": "trtx-bundler", "version": self.tool_version},
            "created": self.created,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, data: Any, *, source: str) -> tuple[Part, list[str]]:
        warnings: list[str] = []
        if not isinstance(data, Mapping) or data.get("kind") != PART_KIND:
            raise ManifestError(
                f'{source}: not a farm part manifest (expected "kind": "{PART_KIND}")',
                hint="pass the PART_DIR that 'trtx-bundle farm-job -o PART_DIR' wrote",
            )
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ManifestError(f"{source}: schema_version: expected an integer >= 1, got {version!r}")
        if version > PART_SCHEMA_VERSION:
            raise ManifestError(
                f"{source}: part schema_version {version} is newer than this trtx-bundler reads (up to {PART_SCHEMA_VERSION})",
                hint="run merge with the trtx-bundler release the farm runs",
            )
        try:
            r = Reader(data, "", warnings)
            r.seen.update({"kind", "schema_version"})
            bundle = r.get("bundle", Mapping)
            b = Reader(bundle, "bundle", warnings)
            tool = Reader(r.get("tool", Mapping), "tool", warnings)
            part = cls(
                schema_version=version,
                bundle_manifest_sha256=b.get("manifest_sha256", str, check=sha256_hex),
                bundle_base_sha256=b.get("base_sha256", str, check=sha256_hex),
                model=b.get("model", str),
                engine=r.obj("engine", Engine._parse, default=None),
                runtime_cache=r.obj("runtime_cache", RuntimeCache._parse),
                warmup=r.objs("warmup", WarmupRun._parse, default=()),
                timings={str(k): float(v) for k, v in r.get("timings", Mapping, default={}, check=_seconds).items()},
                machine={str(k): str(v) for k, v in r.get("machine", Mapping, default={}).items()},
                tool_version=tool.get("version", str),
                created=r.get("created", int),
            )
            tool.get("tool", str)  # always "trtx-bundler": read so that it is not reported as unknown
            for reader in (b, tool, r):
                reader.done()
        except ManifestError as e:
            raise ManifestError(f"{source}: {e}", hint=e.hint) from None
        if part.engine is not None and part.engine.file.sha256 not in part.runtime_cache.engines:
            raise ManifestError(
                f"{source}: runtime_cache.engines does not name the part's own engine {part.engine.file.sha256}"
            )
        return part, warnings


def _seconds(v: Mapping[str, Any]) -> str | None:
    bad = {k: x for k, x in v.items() if isinstance(x, bool) or not isinstance(x, (int, float))}
    return f"expected numbers of seconds, got {bad!r}" if bad else None


def read_part(part_dir: str | os.PathLike[str]) -> tuple[Part, list[str]]:
    path = Path(part_dir) / PART_MANIFEST_NAME
    data = load_json_file(
        path,
        expected=f"a farm part directory with {PART_MANIFEST_NAME} at its root",
        missing_hint="pass the directory 'trtx-bundle farm-job -o PART_DIR' wrote (CI: the downloaded artifact)",
        corrupt_hint="the part is corrupt or truncated; run the farm job again",
    )
    return Part.from_dict(data, source=str(path))


def base_sha256(manifest: Manifest) -> str:
    """Identity of what engines and caches are made from: the manifest minus the farm-filled lists and creation data.

    A part made for an earlier state of a bundle (before another part was merged) still fits it when this
    matches, so parts can be merged one at a time.
    """
    d = manifest.to_dict()
    for key in ("engines", "runtime_caches", "creator"):
        d.pop(key, None)
    return sha256_bytes(json.dumps(d, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def write_part(part_dir: Path, part: Part, blobs: Mapping[str, bytes]) -> None:
    """Write the part into a temp dir beside PART_DIR, then rename it into place: all of it or nothing."""
    part_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{part_dir.name}.", suffix=".tmp", dir=part_dir.parent))
    try:
        for _where, ref in part.files():
            data = blobs[ref.path.split("/", 1)[0]]
            (stage / ref.path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(stage / ref.path, data)
        atomic_write(stage / PART_MANIFEST_NAME, part.to_json())
        os.chmod(stage, 0o755)  # mkdtemp makes 0700; a part is meant to be uploaded and read by other jobs
        with contextlib.suppress(OSError):
            part_dir.rmdir()  # an empty PART_DIR made by CI beforehand; a non-empty one was refused earlier
        os.replace(stage, part_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
