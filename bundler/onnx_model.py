"""Loads an ONNX model (with external data), normalizes it (Constant -> initializer), and writes its weightless skeleton.

After ``load_model`` the main graph's initializers hold no data: their bytes live in ``LoadedModel.weights`` (raw
little-endian, the ONNX raw_data layout), so the weights are in memory once. Weights inside subgraphs (If/Loop/Scan
bodies, Constant nodes) are moved to main-graph initializers first (bundler/hoist.py); only subgraph tensors of at
most SUBGRAPH_INLINE_MAX bytes stay where they are, inline.
``make_skeleton`` points every initializer at the weight store's unpacked raw layout (ONNX external data), so
the skeleton plus ``WeightReader.unpack_raw`` is a complete model for onnxruntime and TRT-RTX's parser.

Dim names: TRT-RTX takes dims of one name to be one dim, so a placeholder name that exporters write for unrelated
axes (``"?"``, ``""``) becomes ``dim_<tensor>_<axis>`` (the name unnamed dims get) in the graph and in the specs
(bundler/dims.py).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from runtime_shim.errors import ModelError
from runtime_shim.fsutil import atomic_write, atomic_writer, sha256_file
from runtime_shim.manifest import TensorSpec, WeightStore
from runtime_shim.store.reader import nbytes_for

from .dims import PLACEHOLDER_DIMS, axis_dim_name, distinct_placeholders
from .hoist import graphs, hoist_constants, hoist_subgraph_weights
from .store_writer import Weight, as_bytes

log = logging.getLogger(__name__)

SKELETON_NAME = "model.onnx"
INLINE_MAX = 1024  # bytes; tensors this small stay inline in the skeleton too (onnx's own size_threshold default)
# Subgraph tensors of at most this many bytes stay in their subgraph, inline: the skeleton would keep them inline
# anyway (INLINE_MAX), so moving them would save nothing and only add outer-scope references, and renames, to the
# graph TRT-RTX parses; in Loop/Scan bodies they are mostly scalars and shape operands.
SUBGRAPH_INLINE_MAX = INLINE_MAX

_DTYPE_NAMES: dict[int, str] = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT16: "int16",
    TensorProto.UINT16: "uint16",
    TensorProto.INT32: "int32",
    TensorProto.UINT32: "uint32",
    TensorProto.INT64: "int64",
    TensorProto.UINT64: "uint64",
    TensorProto.BOOL: "bool",
    TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
}
# Data fields a TensorProto may carry; all cleared once the bytes have moved to LoadedModel.weights.
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_HINT_SHAPES = (
    "export the model with input shapes (dynamic dims may be named), or set them with onnx.tools.update_model_dims"
)


@dataclass
class LoadedModel:
    """A normalized model: graph without data, weights in initializer order, I/O specs for the manifest."""

    path: Path
    proto: onnx.ModelProto  # no tensor data: initializers keep name, dtype and dims only
    weights: list[Weight]  # one per initializer of the main graph, in order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source_sha256: str  # of the .onnx file as given (external data not included)
    opset: int | None
    constants_hoisted: int  # Constant nodes that became initializers
    subgraph_weights_moved: int = 0  # subgraph initializers (and name-sharing Constants) moved to the main graph
    renamed_dims: dict[str, str] = field(default_factory=dict)  # new dim name -> the model's name for it

    def weight(self, name: str) -> Weight:
        return self._by_name[name]  # KeyError(name) when absent

    @functools.cached_property
    def _by_name(self) -> dict[str, Weight]:
        # make_skeleton and write_raw_layout look up every tensor: a scan each made them quadratic in the tensor count
        return {w.name: w for w in self.weights}


def dtype_name(elem_type: int, where: str) -> str:
    try:
        return _DTYPE_NAMES[elem_type]
    except KeyError:
        raise ModelError(
            f"{where}: ONNX element type {TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type} is not supported; "
            f"expected one of {', '.join(sorted(set(_DTYPE_NAMES.values())))}",
            hint="TensorRT for RTX cannot take tensors of this type; cast them in the model",
        ) from None


# --------------------------------------------------------------------------- tensor data
def _external_bytes(t: TensorProto, model_path: Path, cache: dict[str, int]) -> bytes:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    where = f"{model_path}: initializer {t.name!r}"
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise ModelError(
            f"{where}: external data location {location!r} must be a relative path inside {model_path.parent}",
            hint="re-save the model with onnx.save_model(..., save_as_external_data=True, location='<file name>')",
        )
    data_path = model_path.parent / rel
    if location not in cache:
        try:
            cache[location] = data_path.stat().st_size
        except FileNotFoundError:
            raise ModelError(
                f"{model_path}: external data file {data_path} (initializer {t.name!r}) not found",
                hint=f"put {location} next to {model_path.name}, as it was when the model was saved",
            ) from None
    try:
        offset, length = int(info.get("offset", 0)), info.get("length")
    except ValueError:
        raise ModelError(f"{where}: external data offset {info.get('offset')!r} is not an integer") from None
    length = int(length) if length is not None else cache[location] - offset
    if offset < 0 or length < 0 or offset + length > cache[location]:
        raise ModelError(
            f"{where}: external data bytes {offset}..{offset + length} lie outside {data_path} ({cache[location]} bytes); truncated?"
        )
    with open(data_path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _take_bytes(t: TensorProto, model_path: Path, cache: dict[str, int]) -> bytes:
    """The tensor's raw little-endian bytes (ONNX raw_data layout), from wherever it keeps them."""
    if t.data_location == TensorProto.EXTERNAL:
        return _external_bytes(t, model_path, cache)
    if t.HasField("raw_data"):
        return t.raw_data
    # typed fields (float_data, int32_data holding fp16/bf16/int8..., int64_data, ...): let onnx decode them
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _store_size(t: TensorProto) -> int | None:
    """Bytes the tensor takes in the weight store, or None for a type the store cannot hold (it stays put)."""
    dtype = _DTYPE_NAMES.get(t.data_type)
    return None if dtype is None else nbytes_for(dtype, t.dims)


def _strip(t: TensorProto) -> None:
    for f in _DATA_FIELDS:
        t.ClearField(f)
    del t.external_data[:]
    t.data_location = TensorProto.DEFAULT


def _spec(vi: onnx.ValueInfoProto, where: str) -> TensorSpec:
    if not vi.type.HasField("tensor_type"):
        raise ModelError(f"{where} {vi.name!r}: is a {vi.type.WhichOneof('value')}, expected a tensor")
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        raise ModelError(f"{where} {vi.name!r}: no shape (rank unknown)", hint=_HINT_SHAPES)
    shape = tuple(
        d.dim_value
        if d.HasField("dim_value")
        else (d.dim_param if d.dim_param not in PLACEHOLDER_DIMS else axis_dim_name(vi.name, axis))
        for axis, d in enumerate(tt.shape.dim)
    )
    return TensorSpec(name=vi.name, dtype=dtype_name(tt.elem_type, f"{where} {vi.name!r}"), shape=shape)


# --------------------------------------------------------------------------- load
def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Load, check lightly, normalize (Constant -> initializer) and move every initializer's bytes out of the graph."""
    path = Path(path)
    try:
        source_sha256, _ = sha256_file(path)
        model = onnx.load_model(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ModelError(f"{path}: not found; expected an ONNX model file") from None
    except IsADirectoryError:
        raise ModelError(f"{path}: is a directory; expected an ONNX model file (.onnx)") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as e:
        raise ModelError(
            f"{path}: not an ONNX model (cannot parse it as an ONNX ModelProto: {e})",
            hint="pass the .onnx file exported by your framework",
        ) from None
    if model.ir_version <= 0 or not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise ModelError(
            f"{path}: not an ONNX model (no IR version or no graph in it); expected an ONNX ModelProto",
            hint="pass the .onnx file exported by your framework",
        )
    try:
        onnx.checker.check_model(str(path))  # path form: handles external data and models over 2 GB
    except Exception as e:
        log.warning("%s: onnx.checker reports: %s", path, str(e).splitlines()[0] if str(e) else type(e).__name__)

    hoisted = hoist_constants(model)
    subgraph_moved = hoist_subgraph_weights(model, _store_size, SUBGRAPH_INLINE_MAX)
    sizes: dict[str, int] = {}
    weights: list[Weight] = []
    seen: set[str] = set()
    for t in model.graph.initializer:
        where = f"{path}: initializer {t.name!r}"
        if not t.name or t.name in seen:
            raise ModelError(f"{where}: initializer names must be unique and non-empty")
        seen.add(t.name)
        dtype = dtype_name(t.data_type, where)
        raw = _take_bytes(t, path, sizes)
        expected = nbytes_for(dtype, t.dims)
        if len(raw) != expected:
            raise ModelError(
                f"{where}: holds {len(raw)} bytes, expected {expected} for {dtype} {list(t.dims)}; the model is corrupt"
            )
        _strip(t)  # the bytes now live only in `weights`
        weights.append(Weight(name=t.name, dtype=dtype, shape=tuple(t.dims), data=raw))
    for g in list(graphs(model.graph))[1:]:
        for t in g.initializer:  # the small ones that stay in their subgraph: inline, so the skeleton is whole
            if t.data_location == TensorProto.EXTERNAL:
                t.raw_data = _take_bytes(t, path, sizes)
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
    if model.graph.sparse_initializer:
        raise ModelError(
            f"{path}: sparse initializers ({model.graph.sparse_initializer[0].values.name!r}...) are not supported",
            hint="densify them (onnx.numpy_helper) before bundling",
        )

    _clear_negative_dims(model)
    init_names = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(vi, "input") for vi in model.graph.input if vi.name not in init_names)
    outputs = tuple(_spec(vi, "output") for vi in _outputs_with_shapes(model, path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    loaded = LoadedModel(
        path=path,
        proto=model,
        weights=weights,
        inputs=inputs,
        outputs=outputs,
        source_sha256=source_sha256,
        opset=opset,
        constants_hoisted=hoisted,
        subgraph_weights_moved=subgraph_moved,
    )
    distinct_placeholders(loaded)
    log.info(
        "%s: %d weights (%d from Constant nodes, %d moved out of subgraphs), %d inputs, %d outputs",
        path,
        len(weights),
        hoisted,
        subgraph_moved,
        len(inputs),
        len(outputs),
    )
    return loaded


def _clear_negative_dims(model: onnx.ModelProto) -> None:
    """A negative dim_value (some exporters write -1 for "any size") becomes an unnamed dim, as ONNX spells that.

    ONNX Runtime reads it as dynamic already; the specs then name it like any unnamed dim (``dim_<tensor>_<axis>``),
    so ``--dim`` and the profile checks see a dynamic dim instead of a size of -1.
    """
    for g in graphs(model.graph):
        for vi in [*g.input, *g.output, *g.value_info]:
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.ClearField("dim_value")


def _outputs_with_shapes(model: onnx.ModelProto, path: Path) -> list[onnx.ValueInfoProto]:
    outputs = list(model.graph.output)
    if all(o.type.tensor_type.HasField("shape") for o in outputs):
        return outputs
    try:  # the graph holds no data now, so inference is cheap; it usually recovers the rank
        inferred = onnx.shape_inference.infer_shapes(model).graph.output
    except Exception as e:
        log.warning("%s: shape inference failed (%s)", path, e)
        return outputs
    return [i if not o.type.tensor_type.HasField("shape") else o for o, i in zip(outputs, inferred)]


# --------------------------------------------------------------------------- skeleton
def make_skeleton(
    model: LoadedModel, store: WeightStore, external_data_name: str = "weights.bin", *, inline_max: int = INLINE_MAX
) -> bytes:
    """The normalized graph, every initializer pointing at its blob in the unpacked layout ``external_data_name``.

    Tensors of at most ``inline_max`` bytes keep their data inline as well (they are in the store all the same):
    onnxruntime's shape inference cannot read shape operands (Reshape, Unsqueeze, ConstantOfShape...) from
    external data, and ONNX loaders read "to the end of the file" for a zero length. Same input, same bytes.
    """
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model.proto)
    for t in skeleton.graph.initializer:
        where = f"{model.path}: initializer {t.name!r}"
        try:
            wt = store.tensor(t.name)
        except KeyError:
            raise ModelError(
                f"{where}: not in the weight store; the skeleton would lose it",
                hint="write the weight store from the same LoadedModel",
            ) from None
        dtype = dtype_name(t.data_type, where)
        if wt.dtype != dtype or tuple(wt.shape) != tuple(t.dims):
            raise ModelError(f"{where}: weight store has {wt.dtype} {list(wt.shape)}, the model {dtype} {list(t.dims)}")
        blob = store.blobs[wt.blob]
        if blob.nbytes <= inline_max:
            if blob.nbytes:
                t.raw_data = bytes(model.weight(t.name).data)
            continue
        t.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", external_data_name),
            ("offset", str(blob.raw_offset)),
            ("length", str(blob.nbytes)),
        ):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return skeleton.SerializeToString(deterministic=True)


def write_raw_layout(model: LoadedModel, store: WeightStore, path: str | os.PathLike[str]) -> None:
    """Write the unpacked raw layout straight from the model's weights (what WeightReader.unpack_raw produces)."""
    first: dict[int, Weight] = {}
    for wt in store.tensors:
        first.setdefault(wt.blob, model.weight(wt.name))
    with atomic_writer(path) as f:
        pos = 0
        for index in sorted(first, key=lambda i: store.blobs[i].raw_offset):
            blob = store.blobs[index]
            f.write(bytes(blob.raw_offset - pos))
            f.write(as_bytes(first[index].data))
            pos = blob.raw_offset + blob.nbytes
        f.write(bytes(store.raw_size - pos))


def write_normalized_model(
    model: LoadedModel,
    store: WeightStore,
    dest_dir: str | os.PathLike[str],
    external_data_name: str = "weights.bin",
    *,
    skeleton: bytes | None = None,
) -> Path:
    """Skeleton + raw layout in ``dest_dir``: a complete model file for TRT-RTX's parser or onnxruntime. Returns its path.

    ``skeleton``: what ``make_skeleton(model, store, external_data_name)`` returned, when the caller made it already.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    write_raw_layout(model, store, dest / external_data_name)
    path = dest / SKELETON_NAME
    atomic_write(path, skeleton if skeleton is not None else make_skeleton(model, store, external_data_name))
    return path
