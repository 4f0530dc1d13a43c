"""Build settings: bundle.toml, --shape and --dim parsing, merged into BuildOptions (bundler/dims.py fits them to the model).

Shape syntax: dims joined by ``x`` (``1x3x224x224``); a range is ``MIN:OPT:MAX``; a single shape means
min = opt = max. ``--dim NAME=MIN:OPT:MAX`` gives one named dynamic dim a range, shared by every input that
uses it; ``--shape`` sets a whole input. Several profiles: the k-th ``--shape`` given for an input (or
``--dim`` for a dim) belongs to profile k, and one given once applies to every profile (so ``--shape
x=1x3:4x3:8x3 --shape x=8x3:16x3:64x3 --shape mask=1x1`` makes two profiles, both with ``mask`` fixed).
Command-line values replace the file's: any --shape or --dim replaces its [[profiles]], [dims] and [[warmup]].
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_shim.errors import BundleError
from runtime_shim.manifest import (
    WEIGHT_ENCODINGS,
    Profile,
    Shape,
    ShapeRange,
    TensorSpec,
)
from runtime_shim.targets import SUPPORTED_SMS


class ConfigError(BundleError):
    """A bundle.toml, a --shape value, or a profile does not fit the model."""


SHAPE_FLAG_HELP = "--shape NAME=MIN:OPT:MAX (dims joined by x, e.g. --shape input=1x3x224x224:4x3x224x224:16x3x224x224)"
DIM_FLAG_HELP = "--dim NAME=MIN:OPT:MAX (one named dynamic dim, e.g. --dim seq_len=1:128:512; one number = fixed)"


@dataclass(frozen=True)
class DimRange:
    """The range of one named dynamic dim in one optimization profile."""

    min: int
    opt: int
    max: int

    def text(self) -> str:
        """``MIN:OPT:MAX`` as --dim takes it."""
        return f"{self.min}:{self.opt}:{self.max}"

    def disjoint(self, other: DimRange) -> bool:
        """No single size fits both ranges (so one dim cannot have both)."""
        return self.max < other.min or other.max < self.min


DimRanges = Mapping[str, tuple[DimRange, ...]]  # dim name -> one range (every profile) or one per profile


def host_platform() -> str:
    return "windows_amd64" if os.name == "nt" else "linux_x86_64"


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """Everything `build_bundle` needs besides the model and the output directory."""

    name: str | None = None  # default: the ONNX file's stem
    version: str = "0"
    profiles: tuple[Profile, ...] = ()  # per-input ranges; fitted to the model by dims.resolve_profiles
    dims: DimRanges = field(default_factory=dict)  # per-dim ranges, shared by every input using the dim
    warmup_shapes: tuple[Mapping[str, Shape], ...] = ()
    sms: tuple[int, ...] | None = None  # None: TRT-RTX's default targets
    weightful: bool = True
    weightless: bool = True  # only where a GPU that TRT-RTX supports is present
    platforms: tuple[str, ...] = field(default_factory=lambda: (host_platform(),))
    encoding: str = "zstd-byteplane"
    level: int | None = None  # None: the weight writer's default
    threads: int | None = None  # None: the weight writer's default
    force: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """One [[model]] table of bundle.toml: a model of a multi-model bundle and its own shapes."""

    where: str  # "bundle.toml: model[1]", for messages
    source: Path | None = None  # relative paths are resolved against the toml's folder
    name: str | None = None  # default: the source's stem
    version: str | None = None
    profiles: tuple[Profile, ...] = ()
    dims: DimRanges = field(default_factory=dict)
    warmup_shapes: tuple[Mapping[str, Shape], ...] = ()

    @property
    def model_name(self) -> str:
        """The name the model gets: name, else the source's stem (config_file.load_config requires one of them)."""
        return self.name or (self.source.stem if self.source else "")


@dataclass(frozen=True, kw_only=True)
class BundleConfig:
    """bundle.toml as read; None means 'not given' so the command line or the defaults decide."""

    source: str
    models: tuple[ModelConfig, ...] = ()  # [[model]] tables (then name, version and the shapes below are unset)
    name: str | None = None
    version: str | None = None
    sms: tuple[int, ...] | None = None
    weightful: bool | None = None
    encoding: str | None = None
    level: int | None = None
    platforms: tuple[str, ...] | None = None
    profiles: tuple[Profile, ...] = ()
    dims: DimRanges = field(default_factory=dict)
    warmup_shapes: tuple[Mapping[str, Shape], ...] = ()
    farm: Mapping[str, Any] = field(default_factory=dict)  # the farm's own table, read by bundler/farm.py


# --------------------------------------------------------------------------- shapes
_DIMS_RE = re.compile(r"^\d+(x\d+)*$")


def parse_dims(text: str, *, where: str) -> Shape:
    text = text.strip()
    if not _DIMS_RE.match(text):
        raise ConfigError(f"{where}: expected dims joined by 'x' (e.g. 1x3x224x224), got {text!r}")
    return tuple(int(d) for d in text.split("x"))


def parse_range(text: str, *, where: str) -> ShapeRange:
    """``MIN:OPT:MAX`` or one shape (fixed). Checks ranks and min <= opt <= max."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise ConfigError(
            f"{where}: expected MIN:OPT:MAX (or one shape), got {text!r} with {len(parts)} parts",
            hint=f"use {SHAPE_FLAG_HELP}",
        )
    lo, opt, hi = (parse_dims(p, where=where) for p in parts)
    rng = ShapeRange(min=lo, opt=opt, max=hi)
    if problem := rng.problem():
        raise ConfigError(
            f"{where}: {problem}", hint="each dim must satisfy min <= opt <= max, with the same rank in all three"
        )
    return rng


def parse_shape_values(values: Sequence[str]) -> list[tuple[str, ShapeRange]]:
    """``--shape NAME=RANGE`` values as (NAME, range) pairs, in the order given."""
    out = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--shape {value!r}: expected NAME=MIN:OPT:MAX", hint=f"use {SHAPE_FLAG_HELP}")
        out.append((name.strip(), parse_range(rest, where=f"--shape {value}")))
    return out


def parse_shape_args(values: Sequence[str]) -> tuple[Profile, ...]:
    """Turn repeated ``--shape NAME=RANGE`` values into profiles (rule in the module docstring)."""
    per_input: dict[str, list[ShapeRange]] = {}
    for name, rng in parse_shape_values(values):
        per_input.setdefault(name, []).append(rng)
    return profiles_from_lists(per_input, where="--shape")


def parse_dim_range(text: str, *, where: str) -> DimRange:
    """``MIN:OPT:MAX`` or one size (fixed); every size >= 1 and min <= opt <= max."""
    parts = [p.strip() for p in text.split(":")]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"{where}: expected MIN:OPT:MAX (or one size), got {text!r}", hint=f"use {DIM_FLAG_HELP}")
    rng = DimRange(*(int(p) for p in parts))
    if not 1 <= rng.min <= rng.opt <= rng.max:
        raise ConfigError(f"{where}: expected 1 <= min <= opt <= max, got {rng.min} / {rng.opt} / {rng.max}")
    return rng


def parse_dim_values(values: Sequence[str]) -> list[tuple[str, DimRange]]:
    """``--dim NAME=RANGE`` values as (NAME, range) pairs, in the order given."""
    out = []
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--dim {value!r}: expected NAME=MIN:OPT:MAX", hint=f"use {DIM_FLAG_HELP}")
        out.append((name.strip(), parse_dim_range(rest, where=f"--dim {value}")))
    return out


def parse_dim_args(values: Sequence[str]) -> dict[str, tuple[DimRange, ...]]:
    """Turn repeated ``--dim NAME=RANGE`` values into dim name -> ranges (one per profile, or one for all)."""
    per_dim: dict[str, list[DimRange]] = {}
    for name, rng in parse_dim_values(values):
        per_dim.setdefault(name, []).append(rng)
    return {n: tuple(r) for n, r in sorted(per_dim.items())}


def profiles_from_lists(per_input: Mapping[str, list[ShapeRange]], *, where: str) -> tuple[Profile, ...]:
    if not per_input:
        return ()
    counts = {n: len(r) for n, r in per_input.items()}
    n_profiles = max(counts.values())
    uneven = {n: c for n, c in counts.items() if c not in (1, n_profiles)}
    if uneven:
        raise ConfigError(
            f"{where}: {n_profiles} profiles, but "
            + ", ".join(f"{n!r} given {c} times" for n, c in sorted(uneven.items())),
            hint="give each input either once (it applies to every profile) or once per profile",
        )
    return tuple(
        Profile(shapes={n: (r[k] if len(r) > 1 else r[0]) for n, r in sorted(per_input.items())})
        for k in range(n_profiles)
    )


def check_warmups(
    inputs: Sequence[TensorSpec], profiles: Sequence[Profile], warmups: Sequence[Mapping[str, Shape]], *, source: str
) -> None:
    """Every warm-up shape must name a model input, have its rank, and fit at least one profile."""
    specs = {t.name: t for t in inputs}
    for i, warm in enumerate(warmups):
        for name, shape in warm.items():
            spec = specs.get(name)
            where = f"{source}: warmup[{i}].{name}"
            if spec is None:
                raise ConfigError(
                    f"{where}: no model input named {name!r}", hint=f"the model's inputs are: {', '.join(specs)}"
                )
            if len(shape) != len(spec.shape):
                raise ConfigError(
                    f"{where}: rank {len(shape)}, but the input has rank {len(spec.shape)} {fmt_shape(spec.shape)}"
                )
            ranges = [p.shapes[name] for p in profiles if name in p.shapes]
            if ranges and not any(r.contains(shape) for r in ranges):
                raise ConfigError(f"{where}: {'x'.join(map(str, shape))} is outside every profile's range for {name!r}")


def fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --------------------------------------------------------------------------- bundle.toml (read by config_file.py)
def _no_unknown(table: Mapping[str, Any], known: set[str], src: str, prefix: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{src}: {', '.join(prefix + k for k in unknown)}: unknown key",
            hint=f"known keys here: {', '.join(sorted(known))}",
        )


# --------------------------------------------------------------------------- merge
def make_options(
    config: BundleConfig | None = None,
    *,
    shapes: Sequence[str] = (),
    dims: Sequence[str] = (),
    sms: Sequence[int] | None = None,
    name: str | None = None,
    version: str | None = None,
    weightful: bool | None = None,
    encoding: str | None = None,
    level: int | None = None,
    force: bool = False,
) -> BuildOptions:
    """Command line over bundle.toml over defaults.

    Any --shape or --dim replaces the file's [[profiles]], [dims] and [[warmup]] as a whole: the file's
    warm-ups were written for its own profiles (without warm-ups, the farm runs each profile's min/opt/max).
    """
    c = config or BundleConfig(source="(defaults)")
    from_command_line = bool(shapes or dims)
    profiles = parse_shape_args(shapes) if from_command_line else c.profiles
    dim_ranges = parse_dim_args(dims) if from_command_line else c.dims
    chosen_sms = tuple(sms) if sms is not None else c.sms
    if chosen_sms is not None:
        bad = [s for s in chosen_sms if s not in SUPPORTED_SMS]
        if bad:
            raise ConfigError(
                f"--sm: {bad} are not TensorRT for RTX targets",
                hint=f"choose from {', '.join(map(str, SUPPORTED_SMS))}",
            )
        chosen_sms = tuple(sorted(set(chosen_sms)))
    enc = encoding or c.encoding or "zstd-byteplane"
    if enc not in WEIGHT_ENCODINGS:
        raise ConfigError(f"--encoding: expected one of {', '.join(WEIGHT_ENCODINGS)}, got {enc!r}")
    defaults = BuildOptions()
    return BuildOptions(
        name=name or c.name,
        version=version or c.version or defaults.version,
        profiles=profiles,
        dims=dim_ranges,
        warmup_shapes=() if from_command_line else c.warmup_shapes,
        sms=chosen_sms,
        weightful=weightful if weightful is not None else (c.weightful if c.weightful is not None else True),
        platforms=c.platforms or defaults.platforms,
        encoding=enc,
        level=level if level is not None else (c.level if c.level is not None else defaults.level),
        force=force,
    )
