"""The external-data references in a skeleton's protobuf bytes, found (and some inlined) without the onnx package.

The fallback hands ONNX Runtime the skeleton's bytes plus the weights from memory. Every external reference must be
resolved by the shim: ONNX Runtime would otherwise read a file of that name relative to the current directory. So
the walk visits every place ONNX can hold a tensor (graph and subgraph initializers, sparse initializers, tensor
attributes, functions, training info) and returns them all; the caller refuses any it cannot serve.
Only the wire format is parsed, and only along the messages that can hold tensors; other fields are copied as bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .errors import IntegrityError

MAX_DEPTH = 64  # message nesting (graph in node in graph...); real models nest a handful of levels
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Field numbers (onnx.proto) of the sub-messages that can hold a TensorProto, per message kind.
_MODEL = {7: "graph", 20: "training", 25: "function"}
_TRAINING = {1: "graph", 2: "graph"}  # TrainingInfoProto: initialization, algorithm
_FUNCTION = {7: "node", 11: "attribute"}
_GRAPH = {1: "node", 5: "tensor", 15: "sparse", 12: "value_info"}
_NODE = {5: "attribute", 1: "input"}
_ATTRIBUTE = {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"}
_SPARSE = {1: "tensor", 2: "tensor"}
_KINDS = {
    "model": _MODEL,
    "training": _TRAINING,
    "function": _FUNCTION,
    "graph": _GRAPH,
    "node": _NODE,
    "attribute": _ATTRIBUTE,
    "sparse": _SPARSE,
    "value_info": {},
}
# TensorProto fields
_T_DIMS, _T_DTYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14


@dataclass(frozen=True)
class ExternalRef:
    """One tensor whose data the skeleton keeps outside itself."""

    name: str
    location: str
    offset: int
    length: int | None  # None: "to the end of the file"
    dims: tuple[int, ...]
    data_type: int  # TensorProto.DataType
    main: bool  # an initializer of the top-level graph (ONNX Runtime can take those by name)


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed(f"bad varint at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, Any, int, int]]:
    """Yield (field number, wire type, value: an int, (payload start, payload end) or None, field start, field end)."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, first, pos
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed(f"field {number} at byte {first} runs past its message")
            yield number, wire, (pos, pos + size), first, pos + size
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed(f"field {number} at byte {first} runs past its message")
            yield number, wire, None, first, pos
        else:
            raise _Malformed(f"wire type {wire} (field {number}) at byte {first}")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tensor(buf: memoryview, start: int, end: int, main: bool) -> ExternalRef | None:
    name, location, data_type, dims = "", None, 0, []
    info: dict[str, str] = {}
    for number, wire, value, _, _ in _fields(buf, start, end):
        if number == _T_LOCATION and wire == 0:
            location = value
        elif number == _T_NAME and wire == 2:
            name = bytes(buf[value[0] : value[1]]).decode("utf-8", "replace")
        elif number == _T_DTYPE and wire == 0:
            data_type = value
        elif number == _T_DIMS and wire == 0:
            dims.append(value)
        elif number == _T_DIMS and wire == 2:  # packed
            pos, stop = value
            while pos < stop:
                d, pos = _varint(buf, pos, stop)
                dims.append(d)
        elif number == _T_EXTERNAL and wire == 2:
            entry = {}
            for n2, w2, v2, _, _ in _fields(buf, value[0], value[1]):
                if n2 in (1, 2) and w2 == 2:
                    entry[n2] = bytes(buf[v2[0] : v2[1]]).decode("utf-8", "replace")
            info[entry.get(1, "")] = entry.get(2, "")
    if location != EXTERNAL:
        return None
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise _Malformed(f"tensor {name!r}: external data offset/length {info} are not integers") from None
    dims_t = tuple(d - (1 << 64) if d >= 1 << 63 else d for d in dims)  # int64 dims are two's complement varints
    return ExternalRef(name, info.get("location", ""), offset, length, dims_t, data_type, main)


def _walk(
    buf: memoryview,
    start: int,
    end: int,
    kind: str,
    depth: int,
    main: bool,
    found: list[ExternalRef],
    inline: Callable[[ExternalRef], bytes | None] | None,
    used: set[str],
) -> bytes | None:
    """Collect the refs (and the names nodes read) under this message; with ``inline``, return its new bytes if any
    tensor was inlined."""
    if depth > MAX_DEPTH:
        raise _Malformed(f"messages nested more than {MAX_DEPTH} deep")
    subs = _KINDS[kind]
    pieces: list[bytes | memoryview] = []
    changed, copied_to = False, start
    for number, wire, value, first, last in _fields(buf, start, end):
        sub = subs.get(number)
        if sub is None or wire != 2:
            continue
        if sub == "input":  # a node reads this name
            used.add(bytes(buf[value[0] : value[1]]).decode("utf-8", "replace"))
            continue
        if sub == "value_info":  # a graph's output: an initializer can be one
            used.update(
                bytes(buf[v[0] : v[1]]).decode("utf-8", "replace")
                for n, w, v, _, _ in _fields(buf, value[0], value[1])
                if n == 1 and w == 2
            )
            continue
        if sub == "tensor":
            ref = _tensor(buf, value[0], value[1], main and kind == "graph" and number == 5)
            if ref is None:
                continue
            found.append(ref)
            data = inline(ref) if inline is not None else None
            if data is None:
                continue
            new = _inlined_tensor(buf, value[0], value[1], data)
        else:
            sub_new = _walk(
                buf, value[0], value[1], sub, depth + 1, kind == "model" and number == 7, found, inline, used
            )
            if sub_new is None:
                continue
            new = sub_new
        pieces += [buf[copied_to:first], _encode_varint((number << 3) | 2), _encode_varint(len(new)), new]
        copied_to, changed = last, True
    if not changed:
        return None
    pieces.append(buf[copied_to:end])
    return b"".join(pieces)


def _inlined_tensor(buf: memoryview, start: int, end: int, data: bytes) -> bytes:
    # The same TensorProto with its data in raw_data: external_data, data_location and any raw_data dropped.
    kept = [
        buf[first:last]
        for number, _, _, first, last in _fields(buf, start, end)
        if number not in (_T_EXTERNAL, _T_LOCATION, _T_RAW)
    ]
    return b"".join([*kept, _encode_varint((_T_RAW << 3) | 2), _encode_varint(len(data)), data])


def external_refs(skeleton: bytes, where: str) -> tuple[list[ExternalRef], set[str]]:
    """(every tensor in the skeleton whose data is external, in file order; every name a node of any graph reads or
    a graph outputs). ``where`` names the skeleton in errors.

    ONNX Runtime drops top-level initializers that nothing reads before it takes initializers by name, and then
    refuses those names: the second set tells them apart.
    """
    found: list[ExternalRef] = []
    used: set[str] = set()
    _guarded(lambda: _walk(memoryview(skeleton), 0, len(skeleton), "model", 0, True, found, None, used), where)
    return found, used


def inline_refs(skeleton: bytes, where: str, data_for: Callable[[ExternalRef], bytes | None]) -> bytes:
    """The skeleton with the data of each ref for which ``data_for`` returns bytes moved inline (others unchanged)."""
    found: list[ExternalRef] = []
    new = _guarded(
        lambda: _walk(memoryview(skeleton), 0, len(skeleton), "model", 0, True, found, data_for, set()), where
    )
    return skeleton if new is None else new


def _guarded(fn: Callable[[], bytes | None], where: str) -> bytes | None:
    try:
        return fn()
    except _Malformed as e:
        raise IntegrityError(
            f"{where}: not a readable ONNX model ({e})", hint="fetch the bundle again ('trtx-bundle verify' checks it)"
        ) from None
