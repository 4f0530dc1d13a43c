"""The bundle schema: frozen dataclasses for manifest.json, parsed and validated with key paths, serialized canonically.

Compatibility rule (documented in docs/BUNDLE_FORMAT.md): ``schema_version`` is the major version. A newer
major is refused; unknown keys are what a newer minor adds, so they are reported as warnings and dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError, SchemaVersionError
from .fsutil import sha256_bytes
from .schema import (
    SHA_RE,
    Reader,
    dims_check,
    ints_check,
    kind_name,
    non_empty,
    non_negative,
    one_of,
    parse_json,
    read_json_bytes,
    sha256_hex,
)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

ENGINE_KINDS = ("weightless", "weightful")
PLATFORMS = ("linux_x86_64", "windows_amd64")
CUDA_FLAVOURS = ("cu12", "cu13")
WEIGHT_ENCODINGS = ("none", "zstd", "zstd-byteplane")
DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
    "float8e4m3fn",
    "int4",
    "uint4",
)
# Every file but manifest.json lives at <folder>/<sha256>.<ext>: the name is the content.
FILE_FOLDERS = {"engines": ".engine", "caches": ".cache", "weights": ".trtxw", "skeleton": ".onnx"}
_FILE_RE = re.compile(r"^(engines|caches|weights|skeleton)/([0-9a-f]{64})\.(engine|cache|trtxw|onnx)$")

Dim = int | str
Shape = tuple[int, ...]


# --------------------------------------------------------------------------- values
@dataclass(frozen=True, kw_only=True)
class FileRef:
    """A content-addressed file of the bundle: ``path`` is ``<folder>/<sha256>.<ext>``."""

    path: str
    sha256: str
    size: int

    @classmethod
    def for_content(cls, folder: str, sha256: str, size: int) -> FileRef:
        return cls(path=f"{folder}/{sha256}{FILE_FOLDERS[folder]}", sha256=sha256, size=size)

    @staticmethod
    def _parse(r: Reader) -> FileRef:
        ref = FileRef(
            path=r.get("path", str),
            sha256=r.get("sha256", str, check=sha256_hex),
            size=r.get("size", int, check=non_negative),
        )
        m = _FILE_RE.match(ref.path)
        if not m or FILE_FOLDERS[m.group(1)] != "." + m.group(3):
            raise ManifestError(
                f"{r.path}.path: expected '<engines|caches|weights|skeleton>/<sha256>.<ext>', got {ref.path!r}"
            )
        if m.group(2) != ref.sha256:
            raise ManifestError(f"{r.path}.path: file name {m.group(2)} does not match sha256 {ref.sha256}")
        return ref

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str
    version: str = "0"
    source_sha256: str | None = None  # of the ONNX file as given (external data not included)
    opset: int | None = None

    @staticmethod
    def _parse(r: Reader) -> ModelInfo:
        return ModelInfo(
            name=r.get("name", str, check=non_empty),
            version=r.get("version", str, default="0"),
            source_sha256=r.get("source_sha256", str, default=None, check=sha256_hex),
            opset=r.get("opset", int, default=None),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "source_sha256": self.source_sha256, "opset": self.opset}


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """A model input or output. ``shape`` holds ints for fixed dims and names (or -1) for dynamic ones."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if not isinstance(d, int) or d < 0)

    @staticmethod
    def _parse(r: Reader) -> TensorSpec:
        return TensorSpec(
            name=r.get("name", str, check=non_empty),
            dtype=r.get("dtype", str, check=one_of(DTYPES)),
            shape=tuple(r.get("shape", list, check=dims_check)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, kw_only=True)
class ShapeRange:
    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    @staticmethod
    def _parse(r: Reader) -> ShapeRange:
        rng = ShapeRange(
            min=tuple(r.get("min", list, check=ints_check)),
            opt=tuple(r.get("opt", list, check=ints_check)),
            max=tuple(r.get("max", list, check=ints_check)),
        )
        if problem := rng.problem():
            raise ManifestError(f"{r.path}: {problem}")
        return rng

    def problem(self) -> str | None:
        """Why this range is invalid (ranks differ, or not min <= opt <= max per dim), or None."""
        if not (len(self.min) == len(self.opt) == len(self.max)):
            return f"min/opt/max have different ranks: {list(self.min)} / {list(self.opt)} / {list(self.max)}"
        for axis, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if not lo <= mid <= hi:
                return f"axis {axis}: expected min <= opt <= max, got {lo} / {mid} / {hi}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One optimization profile: a shape range for every dynamic input (fixed inputs may be listed too)."""

    shapes: Mapping[str, ShapeRange]

    @staticmethod
    def _parse(r: Reader) -> Profile:
        raw = r.get("shapes", Mapping)
        return Profile(shapes={k: r.sub(v, f"{r.path}.shapes.{k}", ShapeRange._parse) for k, v in sorted(raw.items())})

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": {k: v.to_dict() for k, v in sorted(self.shapes.items())}}

    def triples(self) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Input name -> (min, opt, max), sorted by name: one entry of trt_session.BuildRequest.profiles."""
        return {k: (r.min, r.opt, r.max) for k, r in sorted(self.shapes.items())}


@dataclass(frozen=True, kw_only=True)
class TrtRtx:
    version: str  # exact, e.g. "1.7.1.116": engines and caches run only on this version
    cuda_flavour: str  # "cu12" | "cu13"

    @staticmethod
    def _parse(r: Reader) -> TrtRtx:
        return TrtRtx(
            version=r.get("version", str, check=non_empty),
            cuda_flavour=r.get("cuda_flavour", str, check=one_of(CUDA_FLAVOURS)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "cuda_flavour": self.cuda_flavour}


@dataclass(frozen=True, kw_only=True)
class Frame:
    """One independently decodable piece of a blob in the weight store file."""

    offset: int  # in the weight store file
    size: int  # stored bytes
    raw_size: int  # bytes after decoding
    sha256: str  # of the stored bytes, checked before decoding

    @staticmethod
    def _parse(r: Reader) -> Frame:
        return Frame(
            offset=r.get("offset", int, check=non_negative),
            size=r.get("size", int, check=non_negative),
            raw_size=r.get("raw_size", int, check=non_negative),
            sha256=r.get("sha256", str, check=sha256_hex),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "size": self.size, "raw_size": self.raw_size, "sha256": self.sha256}


@dataclass(frozen=True, kw_only=True)
class Blob:
    """The bytes of one or more identical tensors, stored once."""

    sha256: str  # of the raw bytes
    nbytes: int
    raw_offset: int  # where the raw bytes sit in the unpacked layout (the skeleton's external data file)
    encoding: str  # "none" | "zstd" | "zstd-byteplane"
    element_size: int  # byte-plane width; 1 means no split
    frames: tuple[Frame, ...]

    @staticmethod
    def _parse(r: Reader) -> Blob:
        blob = Blob(
            sha256=r.get("sha256", str, check=sha256_hex),
            nbytes=r.get("nbytes", int, check=non_negative),
            raw_offset=r.get("raw_offset", int, check=non_negative),
            encoding=r.get("encoding", str, check=one_of(WEIGHT_ENCODINGS)),
            element_size=r.get(
                "element_size", int, check=lambda v: None if v in (1, 2, 4, 8) else f"expected 1, 2, 4 or 8, got {v}"
            ),
            frames=r.objs("frames", Frame._parse),
        )
        if sum(f.raw_size for f in blob.frames) != blob.nbytes:
            raise ManifestError(
                f"{r.path}.frames: raw sizes add up to {sum(f.raw_size for f in blob.frames)}, expected nbytes {blob.nbytes}"
            )
        return blob

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "nbytes": self.nbytes,
            "raw_offset": self.raw_offset,
            "encoding": self.encoding,
            "element_size": self.element_size,
            "frames": [f.to_dict() for f in self.frames],
        }


@dataclass(frozen=True, kw_only=True)
class WeightTensor:
    name: str  # the ONNX initializer name, which TRT-RTX refit uses
    dtype: str
    shape: Shape
    blob: int  # index into WeightStore.blobs

    @staticmethod
    def _parse(r: Reader) -> WeightTensor:
        return WeightTensor(
            name=r.get("name", str, check=non_empty),
            dtype=r.get("dtype", str, check=one_of(DTYPES)),
            shape=tuple(r.get("shape", list, check=ints_check)),
            blob=r.get("blob", int, check=non_negative),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "blob": self.blob}


@dataclass(frozen=True, kw_only=True)
class WeightStore:
    """Index of the weight store file (format: docs/WEIGHT_STORE.md)."""

    file: FileRef
    raw_size: int  # size of the unpacked layout, alignment padding included
    alignment: int
    blobs: tuple[Blob, ...]
    tensors: tuple[WeightTensor, ...]

    def tensor(self, name: str) -> WeightTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @staticmethod
    def _parse(r: Reader) -> WeightStore:
        store = WeightStore(
            file=r.obj("file", FileRef._parse),
            raw_size=r.get("raw_size", int, check=non_negative),
            alignment=r.get("alignment", int, check=lambda v: None if v > 0 else "expected > 0"),
            blobs=r.objs("blobs", Blob._parse),
            tensors=r.objs("tensors", WeightTensor._parse),
        )
        names: set[str] = set()
        for i, t in enumerate(store.tensors):
            where = f"{r.path}.tensors[{i}]"
            if t.name in names:
                raise ManifestError(f"{where}.name: duplicate tensor name {t.name!r}")
            names.add(t.name)
            if t.blob >= len(store.blobs):
                raise ManifestError(f"{where}.blob: index {t.blob} out of range ({len(store.blobs)} blobs)")
        for i, b in enumerate(store.blobs):
            if b.raw_offset + b.nbytes > store.raw_size:
                raise ManifestError(
                    f"{r.path}.blobs[{i}]: raw bytes end at {b.raw_offset + b.nbytes}, past raw_size {store.raw_size}"
                )
            for j, f in enumerate(b.frames):
                if f.offset + f.size > store.file.size:
                    raise ManifestError(
                        f"{r.path}.blobs[{i}].frames[{j}]: ends at {f.offset + f.size}, past the file size {store.file.size}"
                    )
        return store

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file.to_dict(),
            "raw_size": self.raw_size,
            "alignment": self.alignment,
            "blobs": [b.to_dict() for b in self.blobs],
            "tensors": [t.to_dict() for t in self.tensors],
        }


@dataclass(frozen=True, kw_only=True)
class Engine:
    kind: str  # "weightless" (stripped, refit from the weight store) | "weightful"
    platform: str  # "linux_x86_64" | "windows_amd64"
    compute_capabilities: tuple[int, ...]  # e.g. (89,) or (80, 86, 89, 120); () = TRT-RTX's default set
    trt_rtx_version: str
    file: FileRef
    built_by: Mapping[str, str] = field(default_factory=dict)  # tool version, host, gpu, ... (informational)

    @staticmethod
    def _parse(r: Reader) -> Engine:
        return Engine(
            kind=r.get("kind", str, check=one_of(ENGINE_KINDS)),
            platform=r.get("platform", str, check=one_of(PLATFORMS)),
            compute_capabilities=tuple(r.get("compute_capabilities", list, check=ints_check)),
            trt_rtx_version=r.get("trt_rtx_version", str, check=non_empty),
            file=r.obj("file", FileRef._parse),
            built_by={str(k): str(v) for k, v in r.get("built_by", Mapping, default={}).items()},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "platform": self.platform,
            "compute_capabilities": list(self.compute_capabilities),
            "trt_rtx_version": self.trt_rtx_version,
            "file": self.file.to_dict(),
            "built_by": dict(sorted(self.built_by.items())),
        }


@dataclass(frozen=True, kw_only=True)
class CacheKey:
    """What TRT-RTX checks before it accepts a runtime cache; there is no fingerprint API, so we record it."""

    os: str  # "linux" | "windows"
    gpu_name: str  # e.g. "NVIDIA GeForce RTX 4090"
    pci_device_id: int  # the SKU, e.g. 0x2684
    sm: int  # e.g. 89
    driver_version: str  # the driver that made the cache: the minimum that accepts it, e.g. "580.95"
    cuda_flavour: str
    trt_rtx_version: str
    cig: bool = False  # CUDA in Graphics

    @staticmethod
    def _parse(r: Reader) -> CacheKey:
        key = CacheKey(
            os=r.get("os", str, check=one_of(("linux", "windows"))),
            gpu_name=r.get("gpu_name", str, check=non_empty),
            pci_device_id=r.get("pci_device_id", int, check=non_negative),
            sm=r.get("sm", int, check=non_negative),
            driver_version=r.get(
                "driver_version",
                str,
                check=lambda v: (
                    None if re.match(r"^\d+(\.\d+)*$", v) else f"expected a version like '580.95', got {v!r}"
                ),
            ),
            cuda_flavour=r.get("cuda_flavour", str, check=one_of(CUDA_FLAVOURS)),
            trt_rtx_version=r.get("trt_rtx_version", str, check=non_empty),
            cig=r.get("cig", bool, default=False),
        )
        return key

    def to_dict(self) -> dict[str, Any]:
        return {
            "os": self.os,
            "gpu_name": self.gpu_name,
            "pci_device_id": self.pci_device_id,
            "sm": self.sm,
            "driver_version": self.driver_version,
            "cuda_flavour": self.cuda_flavour,
            "trt_rtx_version": self.trt_rtx_version,
            "cig": self.cig,
        }


@dataclass(frozen=True, kw_only=True)
class RuntimeCache:
    key: CacheKey
    engines: tuple[str, ...]  # sha256 of the engine files it was made with
    file: FileRef
    created: int | None = None  # unix seconds (for "keep the newest" on merge)

    @staticmethod
    def _parse(r: Reader) -> RuntimeCache:
        return RuntimeCache(
            key=r.obj("key", CacheKey._parse),
            engines=tuple(
                r.get(
                    "engines",
                    list,
                    check=lambda v: (
                        None
                        if all(isinstance(s, str) and SHA_RE.match(s) for s in v)
                        else "expected a list of sha256 hex strings"
                    ),
                )
            ),
            file=r.obj("file", FileRef._parse),
            created=r.get("created", int, default=None),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.to_dict(),
            "engines": list(self.engines),
            "file": self.file.to_dict(),
            "created": self.created,
        }


@dataclass(frozen=True, kw_only=True)
class Skeleton:
    """The ONNX graph without weight data; its external data points at ``external_data`` (the unpacked layout)."""

    file: FileRef
    external_data: str = "weights.bin"

    @staticmethod
    def _parse(r: Reader) -> Skeleton:
        return Skeleton(
            file=r.obj("file", FileRef._parse),
            external_data=r.get(
                "external_data",
                str,
                check=lambda v: (
                    None
                    if re.match(r"^[A-Za-z0-9._-]+$", v) and v not in (".", "..")
                    else f"expected a plain file name, got {v!r}"
                ),
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file.to_dict(), "external_data": self.external_data}


@dataclass(frozen=True, kw_only=True)
class Creator:
    tool: str = "trtx-bundler"
    version: str = "0"
    created: int | None = None  # SOURCE_DATE_EPOCH when set; None keeps builds byte-identical

    @staticmethod
    def _parse(r: Reader) -> Creator:
        return Creator(
            tool=r.get("tool", str), version=r.get("version", str), created=r.get("created", int, default=None)
        )

    def to_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "version": self.version, "created": self.created}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    model: ModelInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...]
    warmup_shapes: tuple[Mapping[str, Shape], ...]
    trt_rtx: TrtRtx
    weights: WeightStore
    skeleton: Skeleton
    engines: tuple[Engine, ...] = ()
    runtime_caches: tuple[RuntimeCache, ...] = ()
    creator: Creator = field(default_factory=Creator)
    schema_version: int = SCHEMA_VERSION

    # ----------------------------------------------------------------- queries
    def files(self) -> list[tuple[str, FileRef]]:
        """Every file the manifest pins, with the key path that pins it (for verify and pack)."""
        out = [("weights.file", self.weights.file), ("skeleton.file", self.skeleton.file)]
        out += [(f"engines[{i}].file", e.file) for i, e in enumerate(self.engines)]
        out += [(f"runtime_caches[{i}].file", c.file) for i, c in enumerate(self.runtime_caches)]
        return out

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    # ----------------------------------------------------------------- (de)serialization
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "manifest.json") -> tuple[Manifest, list[str]]:
        """Parse and validate; returns the manifest and the warnings (unknown keys). Raises ManifestError."""
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
        try:
            r = Reader(data, "", warnings)
            r.seen.add("schema_version")
            manifest = cls(
                schema_version=version,
                model=r.obj("model", ModelInfo._parse),
                inputs=r.objs("inputs", TensorSpec._parse),
                outputs=r.objs("outputs", TensorSpec._parse),
                profiles=r.objs("profiles", Profile._parse),
                warmup_shapes=tuple(_parse_warmups(r)),
                trt_rtx=r.obj("trt_rtx", TrtRtx._parse),
                weights=r.obj("weights", WeightStore._parse),
                skeleton=r.obj("skeleton", Skeleton._parse),
                engines=r.objs("engines", Engine._parse, default=()),
                runtime_caches=r.objs("runtime_caches", RuntimeCache._parse, default=()),
                creator=r.obj("creator", Creator._parse, default=Creator()),
            )
            r.done()
            manifest._check_references()
        except ManifestError as e:
            if str(e).startswith(source):
                raise
            raise type(e)(f"{source}: {e}", hint=e.hint) from None
        return manifest, warnings

    def _check_references(self) -> None:
        names = {t.name for t in self.inputs}
        for i, p in enumerate(self.profiles):
            for name, rng in p.shapes.items():
                if name not in names:
                    raise ManifestError(
                        f"profiles[{i}].shapes.{name}: no input of that name (inputs: {', '.join(sorted(names))})"
                    )
                spec = self.input(name)
                if len(rng.min) != len(spec.shape):
                    raise ManifestError(
                        f"profiles[{i}].shapes.{name}: rank {len(rng.min)}, but the input has rank {len(spec.shape)}"
                    )
        for i, w in enumerate(self.warmup_shapes):
            for name, shape in w.items():
                if name not in names:
                    raise ManifestError(f"warmup_shapes[{i}].{name}: no input of that name")
        engine_shas = {e.file.sha256 for e in self.engines}
        for i, c in enumerate(self.runtime_caches):
            for s in c.engines:
                if s not in engine_shas:
                    raise ManifestError(
                        f"runtime_caches[{i}].engines: {s} is not the sha256 of any engine in this bundle"
                    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profiles": [p.to_dict() for p in self.profiles],
            "warmup_shapes": [{k: list(v) for k, v in sorted(w.items())} for w in self.warmup_shapes],
            "trt_rtx": self.trt_rtx.to_dict(),
            "weights": self.weights.to_dict(),
            "skeleton": self.skeleton.to_dict(),
            "engines": [e.to_dict() for e in self.engines],
            "runtime_caches": [c.to_dict() for c in self.runtime_caches],
            "creator": self.creator.to_dict(),
        }

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, fixed separators, trailing newline (same manifest, same bytes)."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str = "manifest.json") -> tuple[Manifest, list[str]]:
        return cls.from_dict(parse_json(data, source=source, corrupt_hint=_CORRUPT_HINT), source=source)


def _parse_warmups(r: Reader) -> list[Mapping[str, Shape]]:
    raw = r.get("warmup_shapes", list, default=[])
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ManifestError(f"warmup_shapes[{i}]: expected an object of input name -> shape, got {kind_name(item)}")
        shapes = {}
        for name, shape in sorted(item.items()):
            if not isinstance(shape, list) or ints_check(shape):
                raise ManifestError(f"warmup_shapes[{i}].{name}: expected a list of integers >= 0, got {shape!r}")
            shapes[name] = tuple(shape)
        out.append(shapes)
    return out


_CORRUPT_HINT = "the file is corrupt or truncated; fetch the bundle again"


def read_manifest(bundle_dir: str | Path) -> tuple[Manifest, list[str]]:
    """Read ``<bundle_dir>/manifest.json``; errors name the file."""
    manifest, warnings, _raw = _read_manifest_bytes(bundle_dir)
    return manifest, warnings


def read_manifest_sha256(bundle_dir: str | Path) -> tuple[Manifest, list[str], str]:
    """:func:`read_manifest` plus the sha256 of the very bytes parsed (what farm parts name their bundle by)."""
    manifest, warnings, raw = _read_manifest_bytes(bundle_dir)
    return manifest, warnings, sha256_bytes(raw)


def _read_manifest_bytes(bundle_dir: str | Path) -> tuple[Manifest, list[str], bytes]:
    path = Path(bundle_dir) / MANIFEST_NAME
    raw = read_json_bytes(
        path,
        expected="a bundle directory with manifest.json at its root",
        missing_hint="pass the directory made by 'trtx-bundle build' (or 'unpack' an archive first)",
    )
    manifest, warnings = Manifest.from_json(raw, source=str(path))
    return manifest, warnings, raw
