"""The farm part format: part.json (its own schema_version) and the part directory, written all at once.

A part is a directory laid out like a bundle (``engines/<sha256>.engine``, ``caches/<sha256>.cache``) plus
``part.json``, which names the bundle it was made for (sha256 of that bundle's manifest.json, and of the model's
base: its records minus engines and caches, the shared weight index and the TRT-RTX target), the model, the full
runtime-cache key, the warm-up runs, timings and the tool version:

    {"kind": "trtx-bundler-part", "schema_version": 1,
     "bundle": {"manifest_sha256": ..., "base_sha256": ..., "model": "mlp"},
     "engine": <a models[] engines[] entry> | null,             # null: the bundle already had one for this SM
     "runtime_cache": <a models[] runtime_caches[] entry>,      # key: os, gpu_name, pci_device_id, sm,
                                                                #   driver_version, cuda_flavour, trt_rtx_version, cig
     "warmup": [{"profile": 0, "shapes": {"x": [4, 64]}, "first_run_s": 0.8, "rounds": 2}],
     "timings": {"probe_s": ..., "build_s": ..., "load_s": ..., "warmup_s": ..., "serialize_s": ..., "total_s": ...},
     "machine": {"host": ..., "gpu_uuid": ..., "gpu_index": "0", "driver_version": "580.95.05", "platform": ...},
     "tool": {"tool": "trtx-bundler", "version": "0.1.0"}, "created": <unix seconds>}

One part is for one model. The PART_DIR of a farm job (``farm-job -o PART_DIR``, one CI artifact) holds the part
itself for a one-model bundle (PART_DIR/part.json), and one part per model in a sub-directory for a bundle of
several (PART_DIR/<model>/part.json; ``model_dirs`` names them). ``read_parts`` reads either layout, so ``merge``
takes a PART_DIR as CI hands it over.

A newer schema_version is refused (merge with the trtx-bundler release the farm runs); unknown keys are warned
about and dropped, as in manifest.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from runtime_shim import __version__
from runtime_shim.errors import ManifestError
from runtime_shim.fsutil import atomic_write, sha256_bytes
from runtime_shim.manifest import SHAPES_BY_INPUT, Engine, FileRef, Manifest, RuntimeCache, Shape
from runtime_shim.schema import Codec, Key, Record, Sha256, at, canonical_json, load_json_file

PART_SCHEMA_VERSION = 1
PART_KIND = "trtx-bundler-part"
PART_MANIFEST_NAME = "part.json"


class Seconds(Codec):
    """Name -> seconds: numbers in, floats kept, written rounded to microseconds in name order."""

    kinds, expected, identity = (Mapping,), "an object", False

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        bad = {k: x for k, x in value.items() if isinstance(x, bool) or not isinstance(x, (int, float))}
        if bad:
            raise ManifestError(f"{path}: expected numbers of seconds, got {bad!r}")
        return {str(k): float(v) for k, v in value.items()}

    def write(self, value: Any) -> Any:
        return {k: round(v, 6) for k, v in sorted(value.items())}


# --------------------------------------------------------------------------- part manifest
@dataclass(frozen=True, kw_only=True)
class WarmupRun(Record):
    """One warm-up: a shape for every input, run under one optimization profile."""

    profile: int
    shapes: Annotated[Mapping[str, Shape], Key(codec=SHAPES_BY_INPUT)]
    first_run_s: float | None = None  # EAGER compile + run: what a user without this cache would wait
    rounds: int = 0


@dataclass(frozen=True, kw_only=True)
class Part(Record):
    """part.json: what one farm job made, and for which bundle."""

    # "kind" is checked by from_dict; "tool" names the writer, always trtx-bundler (its version is tool_version).
    JSON_CONSTANTS: ClassVar[Mapping[str, Any]] = {"kind": PART_KIND, "tool.tool": "trtx-bundler"}

    schema_version: int = PART_SCHEMA_VERSION  # checked before the rest is read (from_dict)
    # sha256 of the manifest.json bytes the job read
    bundle_manifest_sha256: Annotated[Sha256, Key("bundle.manifest_sha256")]
    # sha256 of that manifest without engines/caches: same model, weights, skeleton, profiles
    bundle_base_sha256: Annotated[Sha256, Key("bundle.base_sha256")]
    model: Annotated[str, Key("bundle.model")]
    engine: Engine | None = None  # the weightless engine this job built; None when the bundle already had one
    runtime_cache: RuntimeCache  # key, file, and the engine it was made with
    warmup: tuple[WarmupRun, ...] = ()
    # seconds: build, load, warmup, serialize, total
    timings: Annotated[Mapping[str, float], Key(codec=Seconds())] = field(default_factory=dict)
    machine: Mapping[str, str] = field(default_factory=dict)  # informational: host, GPU UUID, full driver version
    tool_version: Annotated[str, Key("tool.version", required=True)] = __version__
    created: Annotated[int, Key(required=True)] = 0  # unix seconds; ``merge`` keeps the newest cache per key by default

    def files(self) -> list[tuple[str, FileRef]]:
        out = [("runtime_cache.file", self.runtime_cache.file)]
        if self.engine is not None:
            out.insert(0, ("engine.file", self.engine.file))
        return out

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

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
            return cls.parse(data, warnings=warnings), warnings
        except ManifestError as e:
            raise ManifestError(f"{source}: {e}", hint=e.hint) from None

    def validate(self, path: str) -> None:
        if self.engine is not None and self.engine.file.sha256 not in self.runtime_cache.engines:
            raise ManifestError(
                f"{at(path, 'runtime_cache.engines')} does not name the part's own engine {self.engine.file.sha256}"
            )


_MISSING_HINT = (
    "pass the directory 'trtx-bundle farm-job -o PART_DIR' wrote (CI: the downloaded artifact): it holds part.json, "
    "or, for a bundle of several models, one folder per model holding its part.json"
)


def read_part(part_dir: str | os.PathLike[str]) -> tuple[Part, list[str]]:
    path = Path(part_dir) / PART_MANIFEST_NAME
    data = load_json_file(
        path,
        expected=f"a farm part directory with {PART_MANIFEST_NAME} at its root",
        missing_hint=_MISSING_HINT,
        corrupt_hint="the part is corrupt or truncated; run the farm job again",
    )
    return Part.from_dict(data, source=str(path))


def read_parts(part_dir: str | os.PathLike[str]) -> list[tuple[Path, Part, list[str]]]:
    """Every part in a farm job's PART_DIR, as (its directory, part, warnings): PART_DIR itself when it holds
    part.json, else each sub-directory that does (a bundle of several models), in name order."""
    root = Path(part_dir)
    if root.is_dir() and not os.path.lexists(root / PART_MANIFEST_NAME):
        # Links are not followed: a part's folders are written by farm-job, never linked.
        subs = sorted(
            p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and os.path.lexists(p / PART_MANIFEST_NAME)
        )
        if subs:
            return [(sub, *read_part(sub)) for sub in subs]
    return [(root, *read_part(root))]


_PORTABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Names Windows will not create a file or folder under, whatever the extension.
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)}


def model_dirs(names: Sequence[str]) -> list[str]:
    """The folder of each model's part in a multi-model PART_DIR: the model's name where that is a portable
    folder name, else ``model-<index>`` (names are free text, and a PART_DIR travels between Linux and Windows
    runners, whose file systems ignore case). part.json names its model, so merge never reads the folder name."""
    out: list[str] = []
    taken: set[str] = set()
    for i, name in enumerate(names):
        plain = (
            _PORTABLE_NAME.fullmatch(name)
            and not name.endswith(".")
            and name.split(".")[0].lower() not in _WINDOWS_RESERVED
        )
        candidates = ([name] if plain else []) + [f"model-{i}"]
        candidate = next((c for c in candidates if c.lower() not in taken), "")
        n = 0
        while not candidate or candidate.lower() in taken:
            n += 1
            candidate = f"model-{i}-{n}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def base_sha256(manifest: Manifest) -> str:
    """Identity of what one model's engines and caches are made from: that model's record minus the farm-filled
    lists (engines, runtime caches), plus the weight store index all models share and the TRT-RTX target.

    A part made for an earlier state of a bundle (before another part was merged, into this model or another)
    still fits it when this matches, so parts can be merged one at a time.
    """
    model = manifest.as_model().to_dict()
    for key in ("engines", "runtime_caches"):
        model.pop(key, None)
    d = {"model": model, "weights": manifest.weights.index().to_dict(), "trt_rtx": manifest.whole().trt_rtx.to_dict()}
    return sha256_bytes(json.dumps(d, sort_keys=True, separators=(",", ":")).encode("utf-8"))


class PartStage:
    """A PART_DIR written all at once: parts go into a temp dir beside it, which ``commit`` renames into place.

    The temp dir is made at the first ``add``, so a job that fails before it leaves nothing, not even PART_DIR's
    parent; leaving the ``with`` block without ``commit`` (an error) removes it.
    """

    def __init__(self, part_dir: Path) -> None:
        self.part_dir = part_dir
        self._stage: Path | None = None

    def add(self, part: Part, blobs: Mapping[str, bytes], subdir: str = "") -> Path:
        """Write one part (its files from ``blobs``, by folder: engines, caches) at PART_DIR[/subdir]; returns
        where it will be once committed."""
        if self._stage is None:
            self.part_dir.parent.mkdir(parents=True, exist_ok=True)
            self._stage = Path(
                tempfile.mkdtemp(prefix=f".{self.part_dir.name}.", suffix=".tmp", dir=self.part_dir.parent)
            )
        dest = self._stage / subdir if subdir else self._stage
        for _where, ref in part.files():
            data = blobs[ref.path.split("/", 1)[0]]
            (dest / ref.path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(dest / ref.path, data)
        atomic_write(dest / PART_MANIFEST_NAME, part.to_json())
        return self.part_dir / subdir if subdir else self.part_dir

    def commit(self) -> None:
        if self._stage is None:
            raise ValueError("PartStage.commit: no part was added")
        os.chmod(self._stage, 0o755)  # mkdtemp makes 0700; a part is meant to be uploaded and read by other jobs
        with contextlib.suppress(OSError):
            self.part_dir.rmdir()  # an empty PART_DIR made by CI beforehand; a non-empty one was refused earlier
        os.replace(self._stage, self.part_dir)
        self._stage = None

    def __enter__(self) -> PartStage:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None


def write_part(part_dir: Path, part: Part, blobs: Mapping[str, bytes]) -> None:
    """Write one part at PART_DIR (a one-model bundle's layout): all of it or nothing."""
    with PartStage(part_dir) as stage:
        stage.add(part, blobs)
        stage.commit()
