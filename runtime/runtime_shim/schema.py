"""Typed, key-path-aware reading of JSON objects: the machinery under manifest.json and farm part manifests."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from .errors import ManifestError
from .fsutil import read_regular_file

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


class Reader:
    """Reads one JSON object, remembering the key path for errors and which keys were never read."""

    def __init__(self, data: Any, path: str, warnings: list[str]) -> None:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{path or 'manifest'}: expected an object, got {kind_name(data)}")
        self.data, self.path, self.warnings, self.seen = data, path, warnings, set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(
        self,
        key: str,
        kind: type | tuple[type, ...],
        *,
        default: Any = ...,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                raise ManifestError(f"{self._key(key)}: missing (required)")
            return default
        value = self.data[key]
        if default is not ... and value is None:
            return default
        if isinstance(value, bool) and kind in (int, (int,), float):
            raise ManifestError(f"{self._key(key)}: expected {_type_names(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ManifestError(f"{self._key(key)}: expected {_type_names(kind)}, got {kind_name(value)}")
        if check is not None and (problem := check(value)):
            raise ManifestError(f"{self._key(key)}: {problem}")
        return value

    def obj(self, key: str, parse: Callable[[Reader], T], *, default: Any = ...) -> T:
        raw = self.get(key, Mapping, default=default)
        if raw is default and default is not ...:
            return default
        return self.sub(raw, self._key(key), parse)

    def objs(self, key: str, parse: Callable[[Reader], T], *, default: Any = ...) -> tuple[T, ...]:
        raw = self.get(key, list, default=default)
        if raw is default and default is not ...:
            return default
        return tuple(self.sub(item, f"{self._key(key)}[{i}]", parse) for i, item in enumerate(raw))

    def sub(self, raw: Any, path: str, parse: Callable[[Reader], T]) -> T:
        reader = Reader(raw, path, self.warnings)
        value = parse(reader)
        reader.done()
        return value

    def done(self) -> None:
        for key in sorted(set(self.data) - self.seen):
            self.warnings.append(f"{self._key(key)}: unknown key ignored (written by a newer trtx-bundler?)")


def kind_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        int: "an integer",
        str: "a string",
        list: "a list",
        bool: "a boolean",
        Mapping: "an object",
        float: "a number",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"expected one of {', '.join(options)}, got {v!r}"


def sha256_hex(v: str) -> str | None:
    return None if SHA_RE.match(v) else f"expected 64 lowercase hex digits (sha256), got {v!r}"


def non_negative(v: int) -> str | None:
    return None if v >= 0 else f"expected >= 0, got {v}"


def non_empty(v: str) -> str | None:
    return None if v.strip() else "expected a non-empty string"


def dims_check(v: list) -> str | None:
    for d in v:
        if (
            isinstance(d, bool)
            or not isinstance(d, (int, str))
            or (isinstance(d, int) and d < -1)
            or (isinstance(d, str) and not d)
        ):
            return f"expected dims as integers >= 0 (or -1) or dimension names, got {v!r}"
    return None


def ints_check(v: list) -> str | None:
    if all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        return None
    return f"expected a list of integers >= 0, got {v!r}"


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
    except RecursionError:
        raise ManifestError(f"{source}: nested too deeply to be a manifest", hint=corrupt_hint) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, and an integer of more than 4300 digits
        raise ManifestError(f"{source}: not valid JSON ({e})", hint=corrupt_hint) from None
