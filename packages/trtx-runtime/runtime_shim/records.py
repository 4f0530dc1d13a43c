"""The records a manifest is made of, each field declared once (schema.Record): I/O, profiles, engines, caches, ...

manifest.py assembles them into the bundle's manifest.json (docs/BUNDLE_FORMAT.md) and re-exports them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from .bundle_files import FileRef
from .errors import ManifestError
from .schema import (
    SHA_RE,
    Codec,
    Count,
    Ints,
    Key,
    Name,
    Record,
    Sha256,
    ints_check,
    one_of,
)
from .store_index import DType

ENGINE_KINDS = ("weightless", "weightful")
PLATFORMS = ("linux_x86_64", "windows_amd64")
CUDA_FLAVOURS = ("cu12", "cu13")

Dim = int | str
Shape = Ints  # a tuple of integers >= 0


# Checks of one JSON value (the problem, or None), for Key(check=...).
def _dims(v: list) -> str | None:
    for d in v:
        if (
            isinstance(d, bool)
            or not isinstance(d, (int, str))
            or (isinstance(d, int) and d < -1)
            or (isinstance(d, str) and not d)
        ):
            return f"expected dims as integers >= 0 (or -1) or dimension names, got {v!r}"
    return None


def _sha256_list(v: list) -> str | None:
    return None if all(isinstance(s, str) and SHA_RE.match(s) for s in v) else "expected a list of sha256 hex strings"


def _driver_version(v: str) -> str | None:
    # At most 6 parts of at most 9 digits: the shim compares versions as integers, and a longer one is no driver's.
    if re.fullmatch(r"\d{1,9}(\.\d{1,9}){0,5}", v):
        return None
    return f"expected a version like '580.95', got {_clip(v)}"


# Names, versions and labels the shim compares, shows or keys caches by; no real one comes near this.
MAX_LABEL = 256


def _label(v: str) -> str | None:
    if not v.strip():
        return "expected a non-empty string"
    return None if len(v) <= MAX_LABEL else f"expected at most {MAX_LABEL} characters, got {len(v)}: {_clip(v)}"


def _optional_label(v: str) -> str | None:
    return None if len(v) <= MAX_LABEL else f"expected at most {MAX_LABEL} characters, got {len(v)}: {_clip(v)}"


def _clip(v: str) -> str:
    """A value for an error message: whole when short, else its start and its length (messages stay one line)."""
    return repr(v) if len(v) <= 40 else f"{v[:32]!r}... ({len(v)} characters)"


def _plain_file_name(v: str) -> str | None:
    ok = re.match(r"^[A-Za-z0-9._-]+$", v) and v not in (".", "..")
    return None if ok else f"expected a plain file name, got {v!r}"


EngineKind = Annotated[str, Key(check=one_of(ENGINE_KINDS))]
Platform = Annotated[str, Key(check=one_of(PLATFORMS))]
CudaFlavour = Annotated[str, Key(check=one_of(CUDA_FLAVOURS))]
DriverVersion = Annotated[str, Key(check=_driver_version)]
Label = Annotated[str, Key(check=_label)]


class ShapesByInput(Codec):
    """Input name -> shape (a list of integers >= 0), in name order: warm-up shapes."""

    kinds, expected, identity = (Mapping,), "an object of input name -> shape", False

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        out = {}
        for name, shape in sorted(value.items()):
            if not isinstance(shape, list) or ints_check(shape):
                raise ManifestError(f"{path}.{name}: expected a list of integers >= 0, got {shape!r}")
            out[name] = tuple(shape)
        return out

    def write(self, value: Any) -> Any:
        return {k: list(v) for k, v in sorted(value.items())}


SHAPES_BY_INPUT = ShapesByInput()


# --------------------------------------------------------------------------- model and I/O
@dataclass(frozen=True, kw_only=True)
class ModelInfo(Record):
    name: Label
    version: Annotated[str, Key(check=_optional_label)] = "0"
    source_sha256: Sha256 | None = None  # of the ONNX file as given (external data not included)
    opset: int | None = None


@dataclass(frozen=True, kw_only=True)
class TensorSpec(Record):
    """A model input or output. ``shape`` holds ints for fixed dims and names (or -1) for dynamic ones."""

    name: Name
    dtype: DType
    shape: Annotated[tuple[Dim, ...], Key(check=_dims)]

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape) if not isinstance(d, int) or d < 0)


@dataclass(frozen=True, kw_only=True)
class ShapeRange(Record):
    min: Shape
    opt: Shape
    max: Shape

    def contains(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def problem(self) -> str | None:
        """Why this range is invalid (ranks differ, or not min <= opt <= max per dim), or None."""
        if not (len(self.min) == len(self.opt) == len(self.max)):
            return f"min/opt/max have different ranks: {list(self.min)} / {list(self.opt)} / {list(self.max)}"
        for axis, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if not lo <= mid <= hi:
                return f"axis {axis}: expected min <= opt <= max, got {lo} / {mid} / {hi}"
        return None

    def validate(self, path: str) -> None:
        if problem := self.problem():
            raise ManifestError(f"{path}: {problem}")


@dataclass(frozen=True, kw_only=True)
class Profile(Record):
    """One optimization profile: a shape range for every dynamic input (fixed inputs may be listed too)."""

    shapes: Mapping[str, ShapeRange]

    def triples(self) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Input name -> (min, opt, max), sorted by name: one entry of trt_session.BuildRequest.profiles."""
        return {k: (r.min, r.opt, r.max) for k, r in sorted(self.shapes.items())}


def _node_names(v: list) -> str | None:
    # Bounded like every other label: a hostile manifest cannot make inspect or doctor print megabytes.
    if len(v) > 16 or not all(isinstance(s, str) and len(s) <= 256 for s in v):
        return "expected at most 16 node names of at most 256 characters each"
    return None


def _detail(v: str) -> str | None:
    return None if len(v) <= 2048 else f"expected at most 2048 characters, got {len(v)}"


PARSE_STATUSES = ("ok", "failed", "not_checked")


@dataclass(frozen=True, kw_only=True)
class UnsupportedOp(Record):
    """One op type TRT-RTX's parser refused: how many nodes of it, and the first few of their names."""

    op: Name  # op type, "domain.Type" outside the default ONNX domain
    count: Count
    nodes: Annotated[tuple[str, ...], Key(check=_node_names)] = ()
    detail: Annotated[str | None, Key(check=_detail)] = (
        None  # the parser's reason, where it says more than "unsupported"
    )


@dataclass(frozen=True, kw_only=True)
class ParseVerdict(Record):
    """What TRT-RTX's parser said of the model when it was bundled (absent from JSON: no problem recorded)."""

    status: Annotated[str, Key(check=one_of(PARSE_STATUSES))]  # ok | failed | not_checked
    unsupported_ops: tuple[UnsupportedOp, ...] = ()
    detail: Annotated[str | None, Key(check=_detail)] = (
        None  # the parser's errors naming no node, or why it did not run
    )

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def summary(self) -> str:
        """One line: 'Det x3, MatMulInteger x1' (or the detail)."""
        ops = ", ".join(f"{u.op} x{u.count}" for u in self.unsupported_ops)
        return ops or self.detail or self.status


@dataclass(frozen=True, kw_only=True)
class TrtRtxTarget(Record):
    """The TRT-RTX release a bundle is made for (manifest ``trt_rtx``): one for all its models."""

    version: Label  # exact, e.g. "1.7.1.116": engines and caches run only on this version
    cuda_flavour: CudaFlavour  # "cu12" | "cu13"


@dataclass(frozen=True, kw_only=True)
class TrtRtx(Record):
    """What one model's readers see: the bundle's TRT-RTX target and that model's parser verdict."""

    version: Label  # exact, e.g. "1.7.1.116": engines and caches run only on this version
    cuda_flavour: CudaFlavour  # "cu12" | "cu13"
    verdict: Annotated[ParseVerdict | None, Key(name="parse")] = None  # JSON key "parse" (Record.parse is taken)

    @property
    def cannot_parse(self) -> ParseVerdict | None:
        """The recorded verdict when TRT-RTX's parser refused the model (no engine can be built from it), else None."""
        return self.verdict if self.verdict is not None and self.verdict.failed else None


# --------------------------------------------------------------------------- engines and runtime caches
@dataclass(frozen=True, kw_only=True)
class Engine(Record):
    kind: EngineKind  # "weightless" (stripped, refit from the weight store) | "weightful"
    platform: Platform  # "linux_x86_64" | "windows_amd64"
    compute_capabilities: Ints  # e.g. (89,) or (80, 86, 89, 120); () = TRT-RTX's default set
    trt_rtx_version: Label
    file: FileRef
    built_by: Mapping[str, str] = field(default_factory=dict)  # tool version, host, gpu, ... (informational)


@dataclass(frozen=True, kw_only=True)
class CacheKey(Record):
    """What TRT-RTX checks before it accepts a runtime cache; there is no fingerprint API, so we record it."""

    os: Annotated[str, Key(check=one_of(("linux", "windows")))]
    gpu_name: Label  # e.g. "NVIDIA GeForce RTX 4090"
    pci_device_id: Count  # the SKU, e.g. 0x2684
    sm: Count  # e.g. 89
    driver_version: DriverVersion  # the driver that made the cache: the minimum that accepts it, e.g. "580.95"
    cuda_flavour: CudaFlavour
    trt_rtx_version: Label
    cig: bool = False  # CUDA in Graphics


@dataclass(frozen=True, kw_only=True)
class RuntimeCache(Record):
    key: CacheKey
    engines: Annotated[tuple[str, ...], Key(check=_sha256_list)]  # sha256 of the engine files it was made with
    file: FileRef
    created: int | None = None  # unix seconds (for "keep the newest" on merge)


# --------------------------------------------------------------------------- the rest of the bundle
@dataclass(frozen=True, kw_only=True)
class Skeleton(Record):
    """The ONNX graph without weight data; its external data points at ``external_data`` (the unpacked layout)."""

    file: FileRef
    external_data: Annotated[str, Key(check=_plain_file_name, required=True)] = "weights.bin"


@dataclass(frozen=True, kw_only=True)
class Creator(Record):
    tool: Annotated[str, Key(required=True)] = "trtx-bundler"
    version: Annotated[str, Key(required=True)] = "0"
    created: int | None = None  # SOURCE_DATE_EPOCH when set; None keeps builds byte-identical
