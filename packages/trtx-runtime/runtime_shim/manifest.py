"""The bundle's manifest.json: one weight store shared by one or more models, each with its own graph and artifacts.

``BundleManifest`` is the file (schema 2, docs/BUNDLE_FORMAT.md): the TRT-RTX target, the weight store index, the
models, the creator. ``Manifest`` is what everything that works on one model reads: that model's records and the
store as it sees it (its tensors), in the shape a single-model bundle always had. A view writes back through its
bundle (``to_json``), so code that edits one model keeps the others.

Compatibility rule: ``schema_version`` is the major version. A newer major is refused; unknown keys are what a newer
minor adds, so they are reported as warnings and dropped. Schema 1 (one model, frames pinned by sha256) is read by
rewriting its JSON into schema 2's layout (manifest_v1.py); ``trtx-bundle upgrade`` rewrites the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from .bundle_files import FILE_FOLDERS, FileRef
from .errors import ManifestError, ModelChoiceError, SchemaVersionError
from .fsutil import sha256_bytes
from .manifest_v1 import from_schema_1
from .records import (
    CUDA_FLAVOURS,
    ENGINE_KINDS,
    PARSE_STATUSES,
    PLATFORMS,
    SHAPES_BY_INPUT,
    CacheKey,
    Creator,
    Dim,
    Engine,
    ModelInfo,
    ParseVerdict,
    Profile,
    RuntimeCache,
    Shape,
    ShapeRange,
    Skeleton,
    TensorSpec,
    TrtRtx,
    TrtRtxTarget,
    UnsupportedOp,
)
from .schema import Key, ListOf, Record, at, canonical_json, kind_name, parse_json, read_json_bytes
from .store_index import DTYPES, WEIGHT_ENCODINGS, Blob, DType, Frame, StoreIndex, WeightStore, WeightTensor

__all__ = [
    "CUDA_FLAVOURS",
    "DTYPES",
    "ENGINE_KINDS",
    "FILE_FOLDERS",
    "MANIFEST_NAME",
    "PARSE_STATUSES",
    "PLATFORMS",
    "SCHEMA_VERSION",
    "SHAPES_BY_INPUT",
    "WEIGHT_ENCODINGS",
    "Blob",
    "BundleManifest",
    "CacheKey",
    "Creator",
    "DType",
    "Dim",
    "Engine",
    "FileRef",
    "Frame",
    "Manifest",
    "Model",
    "ModelInfo",
    "ParseVerdict",
    "Profile",
    "RuntimeCache",
    "Shape",
    "ShapeRange",
    "Skeleton",
    "StoreIndex",
    "TensorSpec",
    "TrtRtx",
    "TrtRtxTarget",
    "UnsupportedOp",
    "WeightStore",
    "WeightTensor",
    "read_bundle_manifest",
    "read_manifest",
    "read_manifest_sha256",
]

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
_CORRUPT_HINT = "the file is corrupt or truncated; fetch the bundle again"


@dataclass(frozen=True, kw_only=True)
class Model(ModelInfo):
    """One model of the bundle: who it is (ModelInfo's fields, flat in its models[] entry), its graph, I/O, profiles,
    tensors (into the shared store) and its own artifacts."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    warmup_shapes: Annotated[tuple[Mapping[str, Shape], ...], Key(codec=ListOf(SHAPES_BY_INPUT))] = ()
    # TRT-RTX's parser verdict, written only when it refused the model or did not run (see ParseVerdict).
    verdict: Annotated[ParseVerdict | None, Key(name="parse")] = None
    tensors: tuple[WeightTensor, ...]
    skeleton: Skeleton
    engines: tuple[Engine, ...] = ()
    runtime_caches: tuple[RuntimeCache, ...] = ()

    def validate(self, path: str) -> None:
        """Names that refer across records: profile and warm-up inputs, the engines a runtime cache was made with."""
        names = {t.name for t in self.inputs}
        inputs = {t.name: t for t in self.inputs}
        for i, p in enumerate(self.profiles):
            for name, rng in p.shapes.items():
                where = at(path, f"profiles[{i}].shapes.{name}")
                if name not in names:
                    raise ManifestError(f"{where}: no input of that name (inputs: {', '.join(sorted(names))})")
                if len(rng.min) != len(inputs[name].shape):
                    raise ManifestError(
                        f"{where}: rank {len(rng.min)}, but the input has rank {len(inputs[name].shape)}"
                    )
        for i, w in enumerate(self.warmup_shapes):
            for name in w:
                if name not in names:
                    raise ManifestError(f"{at(path, f'warmup_shapes[{i}].{name}')}: no input of that name")
        engine_shas = {e.file.sha256 for e in self.engines}
        for i, c in enumerate(self.runtime_caches):
            for s in c.engines:
                if s not in engine_shas:
                    raise ManifestError(
                        f"{at(path, f'runtime_caches[{i}].engines')}: {s} is not the sha256 of any engine of this model"
                    )


def _listed(names: tuple[str, ...], show: Any, most: int = 20) -> str:
    """Model names for a message: at most ``most`` of them (a hostile manifest may hold thousands)."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(show(n) for n in names[:most]) + more


def _clip(name: str, most: int = 80) -> str:
    return name if len(name) <= most else f"{name[:most]}... ({len(name)} characters)"


@dataclass(frozen=True, kw_only=True)
class BundleManifest(Record):
    """manifest.json, schema 2 (docs/BUNDLE_FORMAT.md)."""

    schema_version: int = SCHEMA_VERSION  # checked before the rest is read (from_dict)
    trt_rtx: TrtRtxTarget
    weights: StoreIndex
    models: tuple[Model, ...]
    creator: Creator = field(default_factory=Creator)

    # ----------------------------------------------------------------- queries
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def view(self, name: str | None = None, *, source: str = "manifest.json") -> Manifest:
        """One model as ``Manifest``; ``name`` may be left out when the bundle holds one model."""
        if name is None:
            if len(self.models) == 1:
                return self._view(0)
            raise ModelChoiceError(
                f"{source}: the bundle holds {len(self.models)} models ({_listed(self.names, str)}); say which one",
                hint="pass model=NAME to load() (--model NAME on the command line)",
            )
        for i, m in enumerate(self.models):
            if m.name == name:
                return self._view(i)
        raise ModelChoiceError(
            f"{source}: no model named {_clip(name)!r}; the bundle holds {_listed(self.names, repr)}",
            hint="pass one of those names",
        )

    def views(self) -> list[Manifest]:
        return [self._view(i) for i in range(len(self.models))]

    def _view(self, i: int) -> Manifest:
        m = self.models[i]
        return Manifest(
            schema_version=self.schema_version,
            model=ModelInfo(name=m.name, version=m.version, source_sha256=m.source_sha256, opset=m.opset),
            inputs=m.inputs,
            outputs=m.outputs,
            profiles=m.profiles,
            warmup_shapes=m.warmup_shapes,
            trt_rtx=TrtRtx(version=self.trt_rtx.version, cuda_flavour=self.trt_rtx.cuda_flavour, verdict=m.verdict),
            weights=self.weights.with_tensors(m.tensors),
            skeleton=m.skeleton,
            engines=m.engines,
            runtime_caches=m.runtime_caches,
            creator=self.creator,
            bundle=self,
        )

    def files(self) -> list[tuple[str, FileRef]]:
        """Every file the manifest pins, once, with the key path that first pins it (for verify, pack and diff)."""
        seen: set[str] = set()
        return [(k, r) for k, r in self._all_files() if not (r.path in seen or seen.add(r.path))]  # type: ignore[func-returns-value]

    def _all_files(self) -> list[tuple[str, FileRef]]:
        out = [("weights.file", self.weights.file)]
        for i, m in enumerate(self.models):
            p = f"models[{i}]"
            out.append((f"{p}.skeleton.file", m.skeleton.file))
            out += [(f"{p}.engines[{j}].file", e.file) for j, e in enumerate(m.engines)]
            out += [(f"{p}.runtime_caches[{j}].file", c.file) for j, c in enumerate(m.runtime_caches)]
        return out

    def with_view(self, view: Manifest) -> BundleManifest:
        """This bundle with ``view``'s model (matched by name, else added) and its store index and TRT-RTX target."""
        model = view.as_model()
        models = list(self.models)
        for i, m in enumerate(models):
            if m.name == model.name:
                models[i] = model
                break
        else:
            models.append(model)
        return dataclasses.replace(
            self,
            trt_rtx=TrtRtxTarget(version=view.trt_rtx.version, cuda_flavour=view.trt_rtx.cuda_flavour),
            weights=view.weights.index(),
            models=tuple(models),
            creator=view.creator,
        )

    def validate(self, path: str) -> None:
        if not self.models:
            raise ManifestError(f"{at(path, 'models')}: expected at least one model")
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ManifestError(f"{at(path, f'models[{i}].name')}: duplicate model name {m.name!r}")
            seen.add(m.name)
            self.weights.with_tensors(m.tensors).check_tensors(at(path, f"models[{i}].tensors"), at(path, "weights"))
        pins: dict[str, tuple[str, FileRef]] = {}  # models may share a file (an identical skeleton): one pin for it
        for key, ref in self._all_files():
            first = pins.setdefault(ref.path, (key, ref))
            if first[1] != ref:
                raise ManifestError(
                    f"{at(path, key)}: pins {ref.path} as {ref.size} bytes, but {at(path, first[0])} pins it as "
                    f"{first[1].size} bytes; one file has one size"
                )

    # ----------------------------------------------------------------- (de)serialization
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest.json") -> tuple[BundleManifest, list[str]]:
        """Parse and validate (schema 1 or 2); returns the manifest and the warnings (unknown keys)."""
        warnings: list[str] = []
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: expected a JSON object at the top level, got {kind_name(data)}")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ManifestError(f"{source}: schema_version: expected an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{source}: schema_version {version} is newer than this trtx-bundler understands (up to {SCHEMA_VERSION})",
                hint="upgrade trtx-bundler (and the runtime shim you ship) to a release that reads this bundle",
            )
        if version < 1:
            raise ManifestError(f"{source}: schema_version: expected 1..{SCHEMA_VERSION}, got {version}")
        note = ""
        if version == 1:
            data, note = from_schema_1(data, source), " (a schema_version 1 manifest; key paths are schema 2's)"
        try:
            manifest = cls.parse(data, warnings=warnings)
        except ManifestError as e:
            if str(e).startswith(source):
                raise
            raise type(e)(f"{source}: {e}{note}", hint=e.hint) from None
        return manifest, warnings

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["schema_version"] = SCHEMA_VERSION  # what is written is schema 2, whatever was read
        for m in d["models"]:
            if m.get("parse") is None:  # optional: absent, not null (see Model.verdict)
                m.pop("parse", None)
        return d

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, fixed separators, trailing newline (same manifest, same bytes)."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "manifest.json") -> tuple[BundleManifest, list[str]]:
        return cls.from_dict(parse_json(data, source=source, corrupt_hint=_CORRUPT_HINT), source=source)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """One model of a bundle, with the records a single-model manifest had (``BundleManifest.view``)."""

    schema_version: int = SCHEMA_VERSION
    model: ModelInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    warmup_shapes: tuple[Mapping[str, Shape], ...] = ()
    trt_rtx: TrtRtx
    weights: WeightStore
    skeleton: Skeleton
    engines: tuple[Engine, ...] = ()
    runtime_caches: tuple[RuntimeCache, ...] = ()
    creator: Creator = field(default_factory=Creator)
    # The whole manifest this view came from (None for a view built from scratch, e.g. by the bundler).
    bundle: BundleManifest | None = field(default=None, compare=False, repr=False)

    def files(self) -> list[tuple[str, FileRef]]:
        """Every file this model uses (the shared weight file included), with the key path that pins it."""
        i = self.bundle.names.index(self.model.name) if self.bundle and self.model.name in self.bundle.names else 0
        p = f"models[{i}]"
        out = [("weights.file", self.weights.file), (f"{p}.skeleton.file", self.skeleton.file)]
        out += [(f"{p}.engines[{j}].file", e.file) for j, e in enumerate(self.engines)]
        out += [(f"{p}.runtime_caches[{j}].file", c.file) for j, c in enumerate(self.runtime_caches)]
        return out

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def as_model(self) -> Model:
        return Model(
            name=self.model.name,
            version=self.model.version,
            source_sha256=self.model.source_sha256,
            opset=self.model.opset,
            inputs=self.inputs,
            outputs=self.outputs,
            profiles=self.profiles,
            warmup_shapes=self.warmup_shapes,
            verdict=self.trt_rtx.verdict,
            tensors=self.weights.tensors,
            skeleton=self.skeleton,
            engines=self.engines,
            runtime_caches=self.runtime_caches,
        )

    def whole(self) -> BundleManifest:
        """The bundle's manifest with this model as it is here (the other models as they were)."""
        if self.bundle is not None:
            return self.bundle.with_view(self)
        return BundleManifest(
            trt_rtx=TrtRtxTarget(version=self.trt_rtx.version, cuda_flavour=self.trt_rtx.cuda_flavour),
            weights=self.weights.index(),
            models=(self.as_model(),),
            creator=self.creator,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.whole().to_dict()

    def to_json(self) -> bytes:
        return self.whole().to_json()

    @classmethod
    def from_dict(
        cls, data: Any, *, source: str = "manifest.json", model: str | None = None
    ) -> tuple[Manifest, list[str]]:
        """Parse a whole manifest and return one model's view (``model`` may be left out for a one-model bundle)."""
        bundle, warnings = BundleManifest.from_dict(data, source=source)
        return bundle.view(model, source=source), warnings

    @classmethod
    def from_json(
        cls, data: bytes | str, *, source: str = "manifest.json", model: str | None = None
    ) -> tuple[Manifest, list[str]]:
        return cls.from_dict(parse_json(data, source=source, corrupt_hint=_CORRUPT_HINT), source=source, model=model)


# --------------------------------------------------------------------------- reading from a bundle directory
def read_bundle_manifest(bundle_dir: str | Path) -> tuple[BundleManifest, list[str], str]:
    """Read ``<bundle_dir>/manifest.json`` whole: the manifest, its warnings and the sha256 of the bytes parsed."""
    path = Path(bundle_dir) / MANIFEST_NAME
    raw = read_json_bytes(
        path,
        expected="a bundle directory with manifest.json at its root",
        missing_hint="pass the directory made by 'trtx-bundle build' (or 'unpack' an archive first)",
    )
    bundle, warnings = BundleManifest.from_json(raw, source=str(path))
    return bundle, warnings, sha256_bytes(raw)


def read_manifest(bundle_dir: str | Path, model: str | None = None) -> tuple[Manifest, list[str]]:
    """One model of the bundle at ``bundle_dir`` (``model`` may be left out when it holds one); errors name the file."""
    manifest, warnings, _sha = read_manifest_sha256(bundle_dir, model)
    return manifest, warnings


def read_manifest_sha256(bundle_dir: str | Path, model: str | None = None) -> tuple[Manifest, list[str], str]:
    """:func:`read_manifest` plus the sha256 of the very bytes parsed (what farm parts name their bundle by)."""
    bundle, warnings, sha = read_bundle_manifest(bundle_dir)
    return bundle.view(model, source=str(Path(bundle_dir) / MANIFEST_NAME)), warnings, sha
