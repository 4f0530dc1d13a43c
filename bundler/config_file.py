"""bundle.toml: read and validate the file (format: templates/bundle.toml) into a BundleConfig, key paths in errors.

One model: a ``[model]`` table and top-level ``[[profiles]]``, ``[dims]``, ``[[warmup]]``. Several models: one
``[[model]]`` table each (source, name, version, and its own profiles, dims and warm-ups under it), with
``[build]`` and ``[farm]`` for the whole bundle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime_shim.manifest import PLATFORMS, WEIGHT_ENCODINGS, Profile, Shape
from runtime_shim.targets import SUPPORTED_SMS

from .config import (
    BundleConfig,
    ConfigError,
    DimRange,
    ModelConfig,
    _no_unknown,
    parse_dim_range,
    parse_dims,
    parse_range,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

_TOP_KEYS = {"model", "build", "profiles", "dims", "warmup", "farm"}
_MODEL_KEYS = {"source", "name", "version", "profiles", "dims", "warmup"}
_SHAPE_KEYS = ("profiles", "dims", "warmup")


def load_config(path: str | os.PathLike[str]) -> BundleConfig:
    """Read and validate bundle.toml. Errors carry the file and key path."""
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
    tables: tuple[ModelConfig, ...] = ()
    if isinstance(data.get("model"), list):  # [[model]]: several models, each with its own shapes
        tables = _read_models(data["model"], src, path.parent)
        if top := [k for k in _SHAPE_KEYS if k in data]:
            raise ConfigError(
                f"{src}: {', '.join(top)}: with [[model]] tables, each model's profiles, dims and warm-ups go in "
                "its own table",
                hint="move them under the [[model]] table they belong to ([model.dims], [[model.profiles]], "
                "[[model.warmup]])",
            )
        model: dict[str, Any] = {}
    else:
        model = _table(data, "model", src)
        _no_unknown(model, {"name", "version"}, src, "model.")
    build = _table(data, "build", src)
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

    return BundleConfig(
        source=src,
        models=tables,
        name=_opt(model, "name", str, src, "model."),
        version=_opt(model, "version", str, src, "model."),
        sms=tuple(sms) if sms is not None else None,
        weightful=_opt(build, "weightful", bool, src, "build."),
        encoding=encoding,
        level=_opt(build, "level", int, src, "build."),
        platforms=tuple(platforms) if platforms is not None else None,
        profiles=_read_profiles(data.get("profiles", []), src, ""),
        dims=_read_dims(_table(data, "dims", src), src, ""),
        warmup_shapes=_read_warmups(data.get("warmup", []), src, ""),
        farm=_table(data, "farm", src),
    )


def _read_models(raw: list[Any], src: str, base: Path) -> tuple[ModelConfig, ...]:
    out: list[ModelConfig] = []
    for i, table in enumerate(raw):
        prefix = f"model[{i}]."
        if not isinstance(table, dict):
            raise ConfigError(f"{src}: model[{i}]: expected a table ([[model]])")
        _no_unknown(table, _MODEL_KEYS, src, prefix)
        source = _opt(table, "source", str, src, prefix)
        name = _opt(table, "name", str, src, prefix)
        if not source and not name:
            raise ConfigError(
                f"{src}: model[{i}]: expected source = (the ONNX file, relative to this file) or name =",
                hint='e.g. [[model]] then source = "det.onnx"; name = alone names a file given on the command line',
            )
        out.append(
            ModelConfig(
                where=f"{src}: model[{i}]",
                source=base / source if source else None,
                name=name,
                version=_opt(table, "version", str, src, prefix),
                profiles=_read_profiles(table.get("profiles", []), src, prefix),
                dims=_read_dims(_table(table, "dims", src, prefix), src, prefix),
                warmup_shapes=_read_warmups(table.get("warmup", []), src, prefix),
            )
        )
    names = [m.model_name for m in out]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(
            f"{src}: two [[model]] tables name the model {dupes[0]!r}; each model of a bundle needs its own name",
            hint="give one of them name = (a model is named after its source's stem unless name = says otherwise)",
        )
    return tuple(out)


def _read_profiles(raw: Any, src: str, prefix: str) -> tuple[Profile, ...]:
    if not isinstance(raw, list):
        raise ConfigError(
            f"{src}: {prefix}profiles: expected an array of tables ([[{prefix}profiles]]), got {type(raw).__name__}"
        )
    out = []
    for i, table in enumerate(raw):
        where = f"{prefix}profiles[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{src}: {where}: expected a table")
        _no_unknown(table, {"shapes"}, src, f"{where}.")
        shapes = table.get("shapes")
        if not isinstance(shapes, dict) or not shapes:
            raise ConfigError(
                f'{src}: {where}.shapes: expected a table of input name -> "MIN:OPT:MAX"',
                hint=f'e.g. [{prefix}profiles.shapes] then input = "1x3x224x224:4x3x224x224:16x3x224x224"',
            )
        ranges = {}
        for name, text in sorted(shapes.items()):
            if not isinstance(text, str):
                raise ConfigError(f'{src}: {where}.shapes.{name}: expected a string like "1x3:4x3:8x3", got {text!r}')
            ranges[name] = parse_range(text, where=f"{src}: {where}.shapes.{name}")
        out.append(Profile(shapes=ranges))
    return tuple(out)


def _read_dims(table: Mapping[str, Any], src: str, prefix: str) -> dict[str, tuple[DimRange, ...]]:
    out = {}
    for name, value in sorted(table.items()):
        texts = value if isinstance(value, list) else [value]
        if not texts or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in texts):
            raise ConfigError(
                f'{src}: {prefix}dims.{name}: expected "MIN:OPT:MAX" (or an array of them, one per profile), '
                f"got {value!r}",
                hint=f'e.g. [{prefix}dims] then seq_len = "1:128:512"',
            )
        out[name] = tuple(parse_dim_range(str(t), where=f"{src}: {prefix}dims.{name}") for t in texts)
    return out


def _read_warmups(raw: Any, src: str, prefix: str) -> tuple[Mapping[str, Shape], ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{src}: {prefix}warmup: expected an array of tables ([[{prefix}warmup]])")
    out = []
    for i, table in enumerate(raw):
        where = f"{prefix}warmup[{i}]"
        if not isinstance(table, dict) or not table:
            raise ConfigError(f'{src}: {where}: expected a table of input name -> "1x3x224x224"')
        shapes = {}
        for name, text in sorted(table.items()):
            if not isinstance(text, str):
                raise ConfigError(f'{src}: {where}.{name}: expected a string like "1x3x224x224", got {text!r}')
            shapes[name] = parse_dims(text, where=f"{src}: {where}.{name}")
        out.append(shapes)
    return tuple(out)


def _table(data: Mapping[str, Any], key: str, src: str, prefix: str = "") -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: {prefix}{key}: expected a table ([{prefix}{key}]), got {type(value).__name__}")
    return value


def _opt(table: Mapping[str, Any], key: str, kind: type, src: str, prefix: str) -> Any:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{src}: {prefix}{key}: expected {kind.__name__}, got {value!r}")
    return value
