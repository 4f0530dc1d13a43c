"""Build settings: bundle.toml and --shape parsing, merged into BuildOptions and checked against the model's inputs.

Shape syntax: dims joined by ``x`` (``1x3x224x224``); a range is ``MIN:OPT:MAX``; a single shape means
min = opt = max. Several profiles: the k-th ``--shape`` given for an input belongs to profile k, and an
input given once applies to every profile (so ``--shape x=1x3:4x3:8x3 --shape x=8x3:16x3:64x3 --shape
mask=1x1`` makes two profiles, both with ``mask`` fixed). Command-line values replace the file's.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime_shim.errors import BundleError
from runtime_shim.manifest import (
    PLATFORMS,
    WEIGHT_ENCODINGS,
    Profile,
    Shape,
    ShapeRange,
    TensorSpec,
)
from runtime_shim.targets import SUPPORTED_SMS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib


class ConfigError(BundleError):
    """A bundle.toml, a --shape value, or a profile does not fit the model."""


SHAPE_FLAG_HELP = "--shape NAME=MIN:OPT:MAX (dims joined by x, e.g. --shape input=1x3x224x224:4x3x224x224:16x3x224x224)"


def host_platform() -> str:
    return "windows_amd64" if os.name == "nt" else "linux_x86_64"


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """Everything `build_bundle` needs besides the model and the output directory."""

    name: str | None = None  # default: the ONNX file's stem
    version: str = "0"
    profiles: tuple[Profile, ...] = ()  # checked against the model's inputs by resolve_profiles
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
class BundleConfig:
    """bundle.toml as read; None means 'not given' so the command line or the defaults decide."""

    source: str
    name: str | None = None
    version: str | None = None
    sms: tuple[int, ...] | None = None
    weightful: bool | None = None
    encoding: str | None = None
    level: int | None = None
    platforms: tuple[str, ...] | None = None
    profiles: tuple[Profile, ...] = ()
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


def parse_shape_args(values: Sequence[str]) -> tuple[Profile, ...]:
    """Turn repeated ``--shape NAME=RANGE`` values into profiles (rule in the module docstring)."""
    per_input: dict[str, list[ShapeRange]] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--shape {value!r}: expected NAME=MIN:OPT:MAX", hint=f"use {SHAPE_FLAG_HELP}")
        per_input.setdefault(name.strip(), []).append(parse_range(rest, where=f"--shape {value}"))
    return _profiles_from_lists(per_input, where="--shape")


def _profiles_from_lists(per_input: Mapping[str, list[ShapeRange]], *, where: str) -> tuple[Profile, ...]:
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


def resolve_profiles(inputs: Sequence[TensorSpec], profiles: Sequence[Profile], *, source: str) -> tuple[Profile, ...]:
    """Check the profiles against the model's inputs; every dynamic input needs a range in every profile.

    Fixed inputs may be left out (TRT-RTX knows their shape) but, when given, must match the model.
    """
    specs = {t.name: t for t in inputs}
    dynamic = [t for t in inputs if t.dynamic_axes]
    if not profiles:
        if dynamic:
            t = dynamic[0]
            raise ConfigError(
                f"{source}: input {t.name!r} has dynamic dims {_fmt_shape(t.shape)} and no optimization profile gives its range",
                hint=f"pass --shape {t.name}={_example_range(t.shape)} (dims joined by x; MIN:OPT:MAX), or add it under [[profiles]] in bundle.toml"
                + (f"; inputs still to cover: {', '.join(d.name for d in dynamic)}" if len(dynamic) > 1 else ""),
            )
        return ()
    for i, profile in enumerate(profiles):
        where = f"{source}: profile {i}" if len(profiles) > 1 else source
        for name, rng in profile.shapes.items():
            spec = specs.get(name)
            if spec is None:
                raise ConfigError(
                    f"{where}: no model input named {name!r}",
                    hint=f"the model's inputs are: {', '.join(specs) or '(none)'}",
                )
            if len(rng.min) != len(spec.shape):
                raise ConfigError(
                    f"{where}: {name!r} has rank {len(spec.shape)} {_fmt_shape(spec.shape)}, but the range given has rank {len(rng.min)} ({'x'.join(map(str, rng.min))})",
                    hint=f"give {len(spec.shape)} dims, e.g. --shape {name}={_example_range(spec.shape)}",
                )
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int) and dim >= 0 and not (rng.min[axis] == rng.opt[axis] == rng.max[axis] == dim):
                    raise ConfigError(
                        f"{where}: {name!r} axis {axis} is fixed at {dim} in the model, but the range gives {rng.min[axis]}/{rng.opt[axis]}/{rng.max[axis]}",
                        hint=f"keep fixed dims as they are: e.g. --shape {name}={_example_range(spec.shape)}",
                    )
        for t in dynamic:
            if t.name not in profile.shapes:
                raise ConfigError(
                    f"{where}: input {t.name!r} has dynamic dims {_fmt_shape(t.shape)} and no range in this profile",
                    hint=f"add --shape {t.name}={_example_range(t.shape)}",
                )
    return tuple(profiles)


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
                    f"{where}: rank {len(shape)}, but the input has rank {len(spec.shape)} {_fmt_shape(spec.shape)}"
                )
            ranges = [p.shapes[name] for p in profiles if name in p.shapes]
            if ranges and not any(r.contains(shape) for r in ranges):
                raise ConfigError(f"{where}: {'x'.join(map(str, shape))} is outside every profile's range for {name!r}")


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _example_range(shape: Sequence[Any]) -> str:
    """A placeholder range in the model's own dims: fixed dims kept, dynamic ones 1:8:64 for batch-like dims."""

    def dims(v: int) -> str:
        return "x".join(str(d) if isinstance(d, int) and d >= 0 else str(v) for d in shape)

    return f"{dims(1)}:{dims(8)}:{dims(64)}"


# --------------------------------------------------------------------------- bundle.toml
_TOP_KEYS = {"model", "build", "profiles", "warmup", "farm"}


def load_config(path: str | os.PathLike[str]) -> BundleConfig:
    """Read and validate bundle.toml (format: templates/bundle.toml). Errors carry the file and key path."""
    path = Path(path)
    src = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{src}: not found", hint="pass --config with the path of an existing bundle.toml") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{src}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{src}: not valid TOML ({e})", hint="see templates/bundle.toml for the format") from None
    _no_unknown(data, _TOP_KEYS, src, "")
    model = _table(data, "model", src)
    build = _table(data, "build", src)
    _no_unknown(model, {"name", "version"}, src, "model.")
    _no_unknown(build, {"sm", "weightful", "encoding", "level", "platforms"}, src, "build.")

    sms = _opt(build, "sm", list, src, "build.")
    if sms is not None:
        bad = [s for s in sms if isinstance(s, bool) or not isinstance(s, int) or s not in SUPPORTED_SMS]
        if bad:
            raise ConfigError(
                f"{src}: build.sm: {bad} are not TensorRT for RTX targets",
                hint=f"choose from {', '.join(map(str, SUPPORTED_SMS))}",
            )
    encoding = _opt(build, "encoding", str, src, "build.")
    if encoding is not None and encoding not in WEIGHT_ENCODINGS:
        raise ConfigError(f"{src}: build.encoding: expected one of {', '.join(WEIGHT_ENCODINGS)}, got {encoding!r}")
    platforms = _opt(build, "platforms", list, src, "build.")
    if platforms is not None and (not platforms or any(p not in PLATFORMS for p in platforms)):
        raise ConfigError(
            f"{src}: build.platforms: expected a non-empty list from {', '.join(PLATFORMS)}, got {platforms!r}"
        )

    profiles = _read_profiles(data.get("profiles", []), src)
    warmups = _read_warmups(data.get("warmup", []), src)
    return BundleConfig(
        source=src,
        name=_opt(model, "name", str, src, "model."),
        version=_opt(model, "version", str, src, "model."),
        sms=tuple(sms) if sms is not None else None,
        weightful=_opt(build, "weightful", bool, src, "build."),
        encoding=encoding,
        level=_opt(build, "level", int, src, "build."),
        platforms=tuple(platforms) if platforms is not None else None,
        profiles=profiles,
        warmup_shapes=warmups,
        farm=_table(data, "farm", src),
    )


def _read_profiles(raw: Any, src: str) -> tuple[Profile, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{src}: profiles: expected an array of tables ([[profiles]]), got {type(raw).__name__}")
    out = []
    for i, table in enumerate(raw):
        where = f"profiles[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{src}: {where}: expected a table")
        _no_unknown(table, {"shapes"}, src, f"{where}.")
        shapes = table.get("shapes")
        if not isinstance(shapes, dict) or not shapes:
            raise ConfigError(
                f'{src}: {where}.shapes: expected a table of input name -> "MIN:OPT:MAX"',
                hint='e.g. [profiles.shapes] then input = "1x3x224x224:4x3x224x224:16x3x224x224"',
            )
        ranges = {}
        for name, text in sorted(shapes.items()):
            if not isinstance(text, str):
                raise ConfigError(f'{src}: {where}.shapes.{name}: expected a string like "1x3:4x3:8x3", got {text!r}')
            ranges[name] = parse_range(text, where=f"{src}: {where}.shapes.{name}")
        out.append(Profile(shapes=ranges))
    return tuple(out)


def _read_warmups(raw: Any, src: str) -> tuple[Mapping[str, Shape], ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{src}: warmup: expected an array of tables ([[warmup]])")
    out = []
    for i, table in enumerate(raw):
        if not isinstance(table, dict) or not table:
            raise ConfigError(f'{src}: warmup[{i}]: expected a table of input name -> "1x3x224x224"')
        shapes = {}
        for name, text in sorted(table.items()):
            if not isinstance(text, str):
                raise ConfigError(f'{src}: warmup[{i}].{name}: expected a string like "1x3x224x224", got {text!r}')
            shapes[name] = parse_dims(text, where=f"{src}: warmup[{i}].{name}")
        out.append(shapes)
    return tuple(out)


def _table(data: Mapping[str, Any], key: str, src: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: {key}: expected a table ([{key}]), got {type(value).__name__}")
    return value


def _opt(table: Mapping[str, Any], key: str, kind: type, src: str, prefix: str) -> Any:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{src}: {prefix}{key}: expected {kind.__name__}, got {value!r}")
    return value


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
    sms: Sequence[int] | None = None,
    name: str | None = None,
    version: str | None = None,
    weightful: bool | None = None,
    encoding: str | None = None,
    level: int | None = None,
    force: bool = False,
) -> BuildOptions:
    """Command line over bundle.toml over defaults. --shape replaces the file's profiles as a whole."""
    c = config or BundleConfig(source="(defaults)")
    profiles = parse_shape_args(shapes) if shapes else c.profiles
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
        warmup_shapes=c.warmup_shapes,
        sms=chosen_sms,
        weightful=weightful if weightful is not None else (c.weightful if c.weightful is not None else True),
        platforms=c.platforms or defaults.platforms,
        encoding=enc,
        level=level if level is not None else (c.level if c.level is not None else defaults.level),
        force=force,
    )
