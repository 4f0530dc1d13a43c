"""Records declared once: a frozen dataclass per JSON record, read and written by one generic codec.

A record subclasses :class:`Record`. A field's type picks its codec: ``str``/``int``/``float``/``bool`` (``| None``
where null is allowed), a record, ``tuple[Record, ...]``, ``Mapping[str, Record]`` (in key order), ``Mapping[str,
str]`` (coerced, written sorted), ``tuple[scalar, ...]`` (needs a ``check``). ``Annotated[..., Key(...)]`` adds the
rest: a JSON key other than the attribute ("a.b" for key b of the object at a), a check, a codec of its own, or
``required`` for a field whose default JSON must not omit. From that come ``parse`` (errors name the key path, e.g.
``engines[2].sha256: expected ...``; unknown keys are warnings, as a newer minor adds them) and ``to_dict``. Rules
that span fields are each record's ``validate``. A field with a default may be missing or null in JSON.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar, Union

from .errors import ManifestError
from .fsutil import read_regular_file

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
Check = Callable[[Any], str | None]
R = TypeVar("R", bound="Record")


# --------------------------------------------------------------------------- checks (value -> problem or None)
def one_of(options: tuple[str, ...]) -> Check:
    return lambda v: None if v in options else f"expected one of {', '.join(options)}, got {v!r}"


def sha256_hex(v: str) -> str | None:
    return None if SHA_RE.match(v) else f"expected 64 lowercase hex digits (sha256), got {v!r}"


def non_negative(v: int) -> str | None:
    return None if v >= 0 else f"expected >= 0, got {v}"


def non_empty(v: str) -> str | None:
    return None if v.strip() else "expected a non-empty string"


def ints_check(v: list) -> str | None:
    if all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        return None
    return f"expected a list of integers >= 0, got {v!r}"


# --------------------------------------------------------------------------- field declarations
@dataclasses.dataclass(frozen=True)
class Key:
    """What a field's type does not say about its JSON form; several Keys on one field merge, the last one winning."""

    name: str | None = None  # the JSON key when not the attribute name; "a.b" is key b of the object at key a
    check: Check | None = None  # run on the JSON value once its type is right
    codec: Codec | None = None  # for a type the generic codecs do not cover
    required: bool | None = None  # True: required in JSON although the dataclass has a default


Sha256 = Annotated[str, Key(check=sha256_hex)]
Count = Annotated[int, Key(check=non_negative)]
Name = Annotated[str, Key(check=non_empty)]
Ints = Annotated[tuple[int, ...], Key(check=ints_check)]


class Record:
    """Base of the JSON records: ``parse`` and ``to_dict`` come from the dataclass fields (see the module doc)."""

    # Keys written with a fixed value and, on reading, required with that value's type but otherwise ignored.
    JSON_CONSTANTS: ClassVar[Mapping[str, Any]] = {}
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every record is a dataclass

    @classmethod
    def parse(cls: type[R], data: Any, *, path: str = "", warnings: list[str] | None = None) -> R:
        """Read and validate one record; ``path`` prefixes key paths in errors, unknown keys go to ``warnings``."""
        return _read_record(cls, data, path, [] if warnings is None else warnings)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form, keys in declaration order (callers that need canonical bytes sort them)."""
        return _write(_layout(type(self)), self)

    def validate(self, path: str) -> None:
        """Rules that span fields, run after a parse; raise ManifestError naming ``path``. Records override it."""


def at(path: str, key: str) -> str:
    """The key path of ``key`` inside the object at ``path`` (for messages)."""
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- codecs
class Codec:
    """How one JSON value maps to a Python value: the JSON types it takes, then read (type already checked) and write."""

    kinds: tuple[type, ...] = (object,)
    expected = "a value"  # what a type error says was expected
    identity = True  # read and write return the value as it is (the common scalar case skips the calls)

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        return value

    def write(self, value: Any) -> Any:
        return value


class Scalar(Codec):
    def __init__(self, *kinds: type) -> None:
        self.kinds, self.expected = kinds, _type_names(kinds)


class Seq(Codec):
    """A JSON list of scalars, checked as a whole by the field's ``check``; a tuple in Python."""

    kinds, expected, identity = (list,), "a list", False

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        return tuple(value)

    def write(self, value: Any) -> Any:
        return list(value)


class RecordCodec(Codec):
    kinds, expected, identity = (Mapping,), "an object", False

    def __init__(self, cls: type[Record]) -> None:
        self.cls = cls

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        return _read_record(self.cls, value, path, warnings)

    def write(self, value: Any) -> Any:
        return _write(_layout(self.cls), value)


class ListOf(Codec):
    """A JSON list of items of one codec; a tuple in Python; errors name the item (``key[i]``)."""

    kinds, expected, identity = (list,), "a list", False

    def __init__(self, item: Codec) -> None:
        self.item = item

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        return tuple(_read_value(self.item, v, f"{path}[{i}]", warnings) for i, v in enumerate(value))

    def write(self, value: Any) -> Any:
        return [self.item.write(v) for v in value]


class MapOf(Codec):
    """A JSON object of name -> item of one codec, read and written in name order; errors name the entry."""

    kinds, expected, identity = (Mapping,), "an object", False

    def __init__(self, item: Codec) -> None:
        self.item = item

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        return {k: _read_value(self.item, v, f"{path}.{k}", warnings) for k, v in sorted(value.items())}

    def write(self, value: Any) -> Any:
        return {k: self.item.write(v) for k, v in sorted(value.items())}


class StrMap(Codec):
    """Informational name -> text (who built an engine, which machine): values coerced to text, written sorted."""

    kinds, expected, identity = (Mapping,), "an object", False

    def read(self, value: Any, path: str, warnings: list[str]) -> Any:
        return {str(k): str(v) for k, v in value.items()}

    def write(self, value: Any) -> Any:
        return dict(sorted(value.items()))


def _read_value(codec: Codec, value: Any, path: str, warnings: list[str]) -> Any:
    if not isinstance(value, codec.kinds) or (value.__class__ is bool and bool not in codec.kinds):
        raise ManifestError(f"{path or 'manifest'}: expected {codec.expected}, got {kind_name(value)}")
    return value if codec.identity else codec.read(value, path, warnings)


# --------------------------------------------------------------------------- layout: a record class, planned once
class _Slot:
    """One JSON key of a record: the attribute it fills (None: a constant), its codec, check and default."""

    __slots__ = ("attr", "check", "codec", "const", "default", "read", "write")

    def __init__(
        self, attr: str | None, codec: Codec, check: Check | None, default: Callable[[], Any] | None, const: Any = None
    ) -> None:
        self.attr, self.codec, self.check, self.const = attr, codec, check, const
        self.default = default  # None: required in JSON
        # The codec's own read and write, or None where they return the value itself (skips a call per field).
        self.read = None if codec.identity else codec.read
        self.write = None if codec.identity else codec.write


@dataclasses.dataclass(frozen=True)
class _Object:
    entries: tuple[tuple[str, _Slot | _Object], ...]
    keys: frozenset[str]


_LAYOUTS: dict[type, _Object] = {}


def _layout(cls: type[Record]) -> _Object:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        layout = _LAYOUTS[cls] = _plan(cls)
    return layout


def _plan(cls: type[Record]) -> _Object:
    hints = typing.get_type_hints(cls, include_extras=True)
    tree: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, codec, check = _describe(hints[f.name], f"{cls.__name__}.{f.name}")
        if f.default is not dataclasses.MISSING and not key.required:
            default: Callable[[], Any] | None = _returns(f.default)
        elif f.default_factory is not dataclasses.MISSING and not key.required:
            default = f.default_factory
        else:
            default = None
        _place(tree, key.name or f.name, _Slot(f.name, codec, check, default))
    for name, value in cls.JSON_CONSTANTS.items():
        _place(tree, name, _Slot(None, Scalar(type(value)), None, None, value))
    return _freeze(tree)


def _returns(value: Any) -> Callable[[], Any]:
    return lambda: value


def _place(tree: dict[str, Any], dotted: str, slot: _Slot) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[last] = slot


def _freeze(tree: dict[str, Any]) -> _Object:
    entries = tuple((k, _freeze(v) if isinstance(v, dict) else v) for k, v in tree.items())
    return _Object(entries, frozenset(tree))


def _describe(hint: Any, where: str) -> tuple[Key, Codec, Check | None]:
    """(merged Key, codec, check) of one annotation; a type with no codec is a mistake in the declaration."""
    keys: list[Key] = []
    hint = _strip(hint, keys)
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:  # X | None: null is the default (the field has one)
            hint = _strip(args[0], keys)
    key = Key()
    for k in keys:
        key = Key(**{f.name: getattr(k, f.name) or getattr(key, f.name) for f in dataclasses.fields(Key)})
    codec = key.codec or _codec_for(hint, key.check is not None)
    if codec is None:
        raise TypeError(f"{where}: no codec for {hint!r}; declare one with Annotated[..., Key(codec=...)]")
    return key, codec, key.check


def _strip(hint: Any, keys: list[Key]) -> Any:
    while typing.get_origin(hint) is Annotated:
        keys += [m for m in hint.__metadata__ if isinstance(m, Key)]
        hint = hint.__origin__
    return hint


def _codec_for(hint: Any, checked: bool) -> Codec | None:
    if hint in (str, int, bool):
        return Scalar(hint)
    if hint is float:
        return Scalar(int, float)
    if isinstance(hint, type) and issubclass(hint, Record):
        return RecordCodec(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = _strip(args[0], [])
        if isinstance(item, type) and issubclass(item, Record):
            return ListOf(RecordCodec(item))
        return Seq() if checked else None  # a list of scalars is only safe with a check of its items
    if origin is Mapping and args[0] is str:
        item = _strip(args[1], [])
        if isinstance(item, type) and issubclass(item, Record):
            return MapOf(RecordCodec(item))
        return StrMap() if item is str else None
    return None


# --------------------------------------------------------------------------- reading and writing
_MISSING: Any = object()


def _read_record(cls: type[R], data: Any, path: str, warnings: list[str]) -> R:
    if not isinstance(data, Mapping):
        raise ManifestError(f"{path or 'manifest'}: expected an object, got {kind_name(data)}")
    kwargs: dict[str, Any] = {}
    _read_object(_layout(cls), data, path, warnings, kwargs)
    record = cls(**kwargs)
    record.validate(path)
    return record


def _read_object(layout: _Object, data: Mapping, path: str, warnings: list[str], kwargs: dict[str, Any]) -> None:
    for key, node in layout.entries:
        value = data.get(key, _MISSING)
        if isinstance(node, _Object):  # a dotted key's object: required, and read into the same record
            if value is _MISSING:
                raise ManifestError(f"{at(path, key)}: missing (required)")
            if not isinstance(value, Mapping):
                raise ManifestError(f"{at(path, key)}: expected an object, got {kind_name(value)}")
            _read_object(node, value, at(path, key), warnings, kwargs)
            continue
        if value is _MISSING or (value is None and node.default is not None):
            if node.default is None or node.attr is None:  # constants are required
                raise ManifestError(f"{at(path, key)}: missing (required)")
            kwargs[node.attr] = node.default()
            continue
        codec = node.codec
        if not isinstance(value, codec.kinds) or (value.__class__ is bool and bool not in codec.kinds):
            raise ManifestError(f"{at(path, key)}: expected {codec.expected}, got {kind_name(value)}")
        if node.check is not None and (problem := node.check(value)):
            raise ManifestError(f"{at(path, key)}: {problem}")
        if node.attr is not None:
            kwargs[node.attr] = value if node.read is None else node.read(value, at(path, key), warnings)
    for key in sorted(data.keys() - layout.keys):
        warnings.append(f"{at(path, key)}: unknown key ignored (written by a newer trtx-bundler?)")


def _write(layout: _Object, record: Record) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, node in layout.entries:
        if isinstance(node, _Object):
            out[key] = _write(node, record)
        elif node.attr is None:
            out[key] = node.const
        else:
            value = getattr(record, node.attr)
            out[key] = value if value is None or node.write is None else node.write(value)
    return out


def kind_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _type_names(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", str: "a string", list: "a list", bool: "a boolean", Mapping: "an object"}
    return " or ".join(names.get(k, "a number" if k is float else k.__name__) for k in kinds)


# --------------------------------------------------------------------------- JSON files
def load_json_file(path: Path, *, expected: str, missing_hint: str, corrupt_hint: str) -> Any:
    """Read and parse a JSON file; every failure is a ManifestError naming the file and what was expected."""
    return parse_json(
        read_json_bytes(path, expected=expected, missing_hint=missing_hint), source=str(path), corrupt_hint=corrupt_hint
    )


# No manifest or part comes near this; the cap keeps a huge or sparse file from exhausting memory.
MAX_JSON_BYTES = 64 << 20


def read_json_bytes(path: Path, *, expected: str, missing_hint: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a JSON file, unparsed (for callers that also hash them); a ManifestError names what failed.

    Type and size are checked before a byte is read: a FIFO, directory or device, or a file over ``max_bytes``,
    is refused (see fsutil.read_regular_file).
    """
    try:
        return read_regular_file(path, max_bytes, expected, error=ManifestError)
    except FileNotFoundError:
        raise ManifestError(f"{path}: not found; expected {expected}", hint=missing_hint) from None


def parse_json(raw: bytes | str, *, source: str, corrupt_hint: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{source}: not valid JSON ({e})", hint=corrupt_hint) from None
    except RecursionError:
        raise ManifestError(f"{source}: nested too deeply to be a manifest", hint=corrupt_hint) from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise ManifestError(
            f"{source}: not valid JSON here (a number of thousands of digits)", hint=corrupt_hint
        ) from None


def canonical_json(data: Any) -> bytes:
    """Canonical bytes: sorted keys, one-space indent, UTF-8, trailing newline (same record, same bytes)."""
    return (json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
