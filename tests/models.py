"""Small real ONNX models made with onnx.helper, one factory per storage quirk the bundler must handle.

Each ``make_xxx(dir)`` writes ``dir/<name>.onnx`` (plus any external data) and returns its path. Weights come
from a seeded RNG at a realistic scale (normal * 0.05), so the same call always writes the same bytes and
compression figures resemble those of trained models. ``ALL_BUNDLABLE`` lists every model TRT-RTX can parse,
with a default optimization profile for its dynamic inputs, so other tests can loop over all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime_shim.manifest import Profile, ShapeRange

OPSET = 17
IR_VERSION = 8  # old enough for every onnxruntime and for TRT-RTX's parser

ShapeTriple = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
ProfileDict = Mapping[str, ShapeTriple]


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng: np.random.Generator, *shape: int, dtype: type = np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.05).astype(dtype)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="trtx-bundler-tests")
    model.ir_version = IR_VERSION
    return model


def _save(model: onnx.ModelProto, dir: Path, name: str) -> Path:
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    path = dir / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return path


def _mlp_graph(
    name: str,
    dtype: int,
    np_dtype: type,
    batch: str | int,
    seed: int,
    d_in: int = 64,
    d_hidden: int = 128,
    d_out: int = 32,
) -> onnx.GraphProto:
    rng = _rng(seed)
    inits = [
        numpy_helper.from_array(_w(rng, d_in, d_hidden, dtype=np_dtype), "fc1.weight"),
        numpy_helper.from_array(_w(rng, d_hidden, dtype=np_dtype), "fc1.bias"),
        numpy_helper.from_array(_w(rng, d_hidden, d_out, dtype=np_dtype), "fc2.weight"),
        numpy_helper.from_array(_w(rng, d_out, dtype=np_dtype), "fc2.bias"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"], name="fc1_matmul"),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"], name="fc1_add"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "fc2.weight"], ["h3"], name="fc2_matmul"),
        helper.make_node("Add", ["h3", "fc2.bias"], ["y"], name="fc2_add"),
    ]
    return helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", dtype, [batch, d_in])],
        [helper.make_tensor_value_info("y", dtype, [batch, d_out])],
        initializer=inits,
    )


# --------------------------------------------------------------------------- (a) conv net
def make_conv(dir: Path) -> Path:
    """Conv+Relu+Conv+GlobalAveragePool+Flatten+Gemm; input [batch,3,height,width], all three dims dynamic."""
    rng = _rng(1)
    inits = [
        numpy_helper.from_array(_w(rng, 8, 3, 3, 3), "conv1.weight"),
        numpy_helper.from_array(_w(rng, 8), "conv1.bias"),
        numpy_helper.from_array(_w(rng, 16, 8, 3, 3), "conv2.weight"),
        numpy_helper.from_array(_w(rng, 16), "conv2.bias"),
        numpy_helper.from_array(_w(rng, 10, 16), "fc.weight"),
        numpy_helper.from_array(_w(rng, 10), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    return _save(_model(graph), dir, "conv")


# --------------------------------------------------------------------------- (b), (c) MLPs
def make_mlp(dir: Path) -> Path:
    """MatMul+Add MLP, fp32, dynamic batch."""
    return _save(_model(_mlp_graph("mlp", TensorProto.FLOAT, np.float32, "batch", seed=2)), dir, "mlp")


def make_mlp_fp16(dir: Path) -> Path:
    """The same MLP with fp16 weights and fp16 inputs/outputs."""
    return _save(_model(_mlp_graph("mlp_fp16", TensorProto.FLOAT16, np.float16, "batch", seed=2)), dir, "mlp_fp16")


# --------------------------------------------------------------------------- (d) Constant nodes
def make_constants(dir: Path) -> Path:
    """Weights held by Constant nodes (value tensor, value_float, value_ints) instead of initializers."""
    rng = _rng(4)
    w1, b1, w2 = _w(rng, 32, 48), _w(rng, 48), _w(rng, 48, 16)
    nodes = [
        helper.make_node("Constant", [], ["w1"], name="const_w1", value=numpy_helper.from_array(w1)),
        helper.make_node("Constant", [], ["b1"], name="const_b1", value=numpy_helper.from_array(b1)),
        helper.make_node("Constant", [], ["w2"], name="const_w2", value=numpy_helper.from_array(w2)),
        helper.make_node("Constant", [], ["scale"], name="const_scale", value_float=0.5),
        helper.make_node("Constant", [], ["out_shape"], name="const_shape", value_ints=[-1, 4, 4]),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="mm2"),
        helper.make_node("Mul", ["h3", "scale"], ["h4"], name="scale"),
        helper.make_node("Reshape", ["h4", "out_shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4])],
    )
    return _save(_model(graph), dir, "constants")


# --------------------------------------------------------------------------- (e) external data
EXTERNAL_DATA_NAME = "mlp_external.onnx.data"


def make_external(dir: Path) -> Path:
    """The fp32 MLP with its (large enough) tensors in one ONNX external-data file beside the model."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    model = _model(_mlp_graph("mlp_external", TensorProto.FLOAT, np.float32, "batch", seed=5))
    onnx.checker.check_model(model)
    path = dir / "mlp_external.onnx"
    # size_threshold=0: every tensor goes out, biases included, as exporters do for big models.
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_NAME,
        size_threshold=0,
    )
    return path


# --------------------------------------------------------------------------- (f) typed fields
def make_typed_fields(dir: Path) -> Path:
    """Weights in float_data, int32_data (fp16, as the spec stores it) and int64_data, not raw_data."""
    rng = _rng(6)
    w = _w(rng, 16, 32)
    b16 = _w(rng, 32, dtype=np.float16)
    inits = [
        helper.make_tensor("w", TensorProto.FLOAT, [16, 32], w.flatten().tolist(), raw=False),
        # make_tensor stores fp16 as uint16 bit patterns in int32_data when raw=False
        helper.make_tensor("b16", TensorProto.FLOAT16, [32], b16, raw=False),
        helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 4, 8], raw=False),
    ]
    assert not any(t.raw_data for t in inits), "typed-field model must not use raw_data"
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h0"], name="mm"),
        helper.make_node("Cast", ["b16"], ["b32"], name="cast_bias", to=TensorProto.FLOAT),
        helper.make_node("Add", ["h0", "b32"], ["h1"], name="add"),
        helper.make_node("Reshape", ["h1", "shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "typed_fields",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])],
        initializer=inits,
    )
    return _save(_model(graph), dir, "typed_fields")


# --------------------------------------------------------------------------- (g) duplicate tensors
def make_duplicates(dir: Path) -> Path:
    """Two layers whose weights (and biases) are byte-identical tensors under different names."""
    rng = _rng(7)
    w, b = _w(rng, 32, 32), _w(rng, 32)
    inits = [
        numpy_helper.from_array(w, "layer1.weight"),
        numpy_helper.from_array(b, "layer1.bias"),
        numpy_helper.from_array(w.copy(), "layer2.weight"),
        numpy_helper.from_array(b.copy(), "layer2.bias"),
        numpy_helper.from_array(_w(rng, 32, 8), "head.weight"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "layer1.weight"], ["a0"]),
        helper.make_node("Add", ["a0", "layer1.bias"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["a2"]),
        helper.make_node("MatMul", ["a2", "layer2.weight"], ["b0"]),
        helper.make_node("Add", ["b0", "layer2.bias"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["b2"]),
        helper.make_node("MatMul", ["b2", "head.weight"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "duplicates",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=inits,
    )
    return _save(_model(graph), dir, "duplicates")


# --------------------------------------------------------------------------- (h) unparseable
UNSUPPORTED_OP = "Det"  # valid ONNX that onnxruntime runs; TRT-RTX 1.7's parser rejects it (checked)


def make_unsupported(dir: Path) -> Path:
    """A valid ONNX model (checker and onnxruntime accept it) with an op TRT-RTX's parser rejects."""
    inits = [numpy_helper.from_array(_w(_rng(8), 3, 3), "offset")]
    nodes = [
        helper.make_node("Add", ["x", "offset"], ["h"], name="add"),
        helper.make_node(UNSUPPORTED_OP, ["h"], ["y"], name="determinant"),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        initializer=inits,
    )
    return _save(_model(graph), dir, "unsupported")


# profile for make_unsupported, for tests that expect the parse (not the profile) to fail
UNSUPPORTED_PROFILE: ProfileDict = {"x": ((1, 3, 3), (4, 3, 3), (16, 3, 3))}


# --------------------------------------------------------------------------- (i) fixed shape
def make_fixed(dir: Path) -> Path:
    """An MLP with no dynamic dims at all (input [2, 64])."""
    return _save(_model(_mlp_graph("fixed", TensorProto.FLOAT, np.float32, 2, seed=9)), dir, "fixed")


_BATCH: ShapeTriple = ((1,), (4,), (16,))


def _batch(rest: tuple[int, ...]) -> ShapeTriple:
    return tuple((b[0], *rest) for b in _BATCH)  # type: ignore[return-value]


def as_profiles(profile: ProfileDict | None) -> tuple[Profile, ...]:
    """The profile as BuildOptions.profiles takes it (none for a model whose inputs are all fixed)."""
    if not profile:
        return ()
    return (
        Profile(shapes={k: ShapeRange(min=tuple(v[0]), opt=tuple(v[1]), max=tuple(v[2])) for k, v in profile.items()}),
    )


def shape_args(profile: ProfileDict | None) -> list[str]:
    """The profile as ``--shape NAME=MIN:OPT:MAX`` values (what make_options(shapes=...) takes)."""
    return [f"{n}={':'.join('x'.join(map(str, s)) for s in rng)}" for n, rng in (profile or {}).items()]


# (name, factory, default profile for dynamic inputs or None when every input is fixed)
ALL_BUNDLABLE: list[tuple[str, Callable[[Path], Path], ProfileDict | None]] = [
    ("conv", make_conv, {"input": ((1, 3, 16, 16), (2, 3, 32, 32), (4, 3, 64, 64))}),
    ("mlp", make_mlp, {"x": _batch((64,))}),
    ("mlp_fp16", make_mlp_fp16, {"x": _batch((64,))}),
    ("constants", make_constants, {"x": _batch((32,))}),
    ("external", make_external, {"x": _batch((64,))}),
    ("typed_fields", make_typed_fields, {"x": _batch((16,))}),
    ("duplicates", make_duplicates, {"x": _batch((32,))}),
    ("fixed", make_fixed, None),
]


def sample_inputs(name: str, profile: ProfileDict | None, model_path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs at the profile's opt shape (or the model's fixed shape), in the model's input dtype."""
    model = onnx.load(str(model_path), load_external_data=False)
    rng = _rng(seed)
    out = {}
    for inp in model.graph.input:
        t = inp.type.tensor_type
        if profile and inp.name in profile:
            shape = profile[inp.name][1]
        else:
            shape = tuple(d.dim_value for d in t.shape.dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        out[inp.name] = rng.standard_normal(shape).astype(dtype)
    return out


# --------------------------------------------------------------------------- (j) weights inside subgraphs
# Initializers in If/Loop bodies, as exporters write them; bundler/hoist.py moves the large ones to the main graph.
SUBGRAPH_D = 64  # a [64, 64] float32 weight is 16 KiB: well over the 1 KiB a subgraph tensor may keep inline


def _branch(tag: str, rng: np.random.Generator, *, outputs_weight: bool) -> onnx.GraphProto:
    """y = (h @ w + b) * c: ``w`` (16 KiB, the name the main graph uses too), ``b`` (256 B, stays inline) and a
    Constant ``c`` (16 KiB, the same name in both branches); ``z`` is the branch's own ``big`` (2 KiB) or computed."""
    d = SUBGRAPH_D
    inits = [
        numpy_helper.from_array(_w(rng, d, d), "w"),
        numpy_helper.from_array(_w(rng, d), "b"),
        numpy_helper.from_array(_w(rng, 512), "big"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(_w(rng, d, d) + 1)),
        helper.make_node("MatMul", ["h", "w"], [f"m_{tag}"]),
        helper.make_node("Add", [f"m_{tag}", "b"], [f"a_{tag}"]),
        helper.make_node("MatMul", [f"a_{tag}", "c"], [f"y_{tag}"]),
    ]
    z = "big"
    if not outputs_weight:
        nodes.append(helper.make_node("Neg", ["big"], [f"z_{tag}"]))
        z = f"z_{tag}"
    return helper.make_graph(
        nodes,
        tag,
        [],
        [
            helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, ["batch", d]),
            helper.make_tensor_value_info(z, TensorProto.FLOAT, [512]),
        ],
        initializer=inits,
    )


def _if_inputs() -> list[onnx.ValueInfoProto]:
    return [
        helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SUBGRAPH_D]),
    ]


def make_if_weights(dir: Path) -> Path:
    """h = x @ w; If(flag) with large initializers in both branches, one named like the main graph's ``w``."""
    rng = _rng(20)
    then_b, else_b = _branch("then", rng, outputs_weight=True), _branch("else", rng, outputs_weight=False)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("If", ["flag"], ["y", "z"], then_branch=then_b, else_branch=else_b),
        ],
        "if_weights",
        _if_inputs(),
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SUBGRAPH_D]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [512]),
        ],
        initializer=[numpy_helper.from_array(_w(rng, SUBGRAPH_D, SUBGRAPH_D), "w")],
    )
    return _save(_model(graph), dir, "if_weights")


def make_nested_if(dir: Path) -> Path:
    """If(flag) whose then-branch holds another If(flag2); ``u`` is defined in both outer branches and used inside
    the inner one, whose branches shadow the outer then-branch's ``w`` with their own."""
    rng, d = _rng(21), SUBGRAPH_D

    def inner(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["h", "w"], [f"p_{tag}"]),
                helper.make_node("MatMul", [f"p_{tag}", "u"], [f"q_{tag}"]),
            ],
            tag,
            [],
            [helper.make_tensor_value_info(f"q_{tag}", TensorProto.FLOAT, ["batch", d])],
            initializer=[numpy_helper.from_array(_w(rng, d, d), "w")],
        )

    outer_then = helper.make_graph(
        [
            helper.make_node("If", ["flag2"], ["r"], then_branch=inner("inner_then"), else_branch=inner("inner_else")),
            helper.make_node("MatMul", ["r", "w"], ["y_then"]),
        ],
        "outer_then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["batch", d])],
        initializer=[numpy_helper.from_array(_w(rng, d, d), "w"), numpy_helper.from_array(_w(rng, d, d), "u")],
    )
    outer_else = helper.make_graph(
        [helper.make_node("MatMul", ["h", "u"], ["y_else"])],
        "outer_else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["batch", d])],
        initializer=[numpy_helper.from_array(_w(rng, d, d), "u")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["h"]),
            helper.make_node("If", ["flag"], ["y"], then_branch=outer_then, else_branch=outer_else),
        ],
        "nested_if",
        [*_if_inputs(), helper.make_tensor_value_info("flag2", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])],
    )
    return _save(_model(graph), dir, "nested_if")


def make_loop_weights(dir: Path) -> Path:
    """Loop (3 iterations) whose body holds its weights: h <- tanh(h @ w + b), ``w`` named like the main graph's."""
    rng, d = _rng(22), SUBGRAPH_D
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["h_in", "w"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Tanh", ["a"], ["h_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", d]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", d]),
        ],
        initializer=[numpy_helper.from_array(_w(rng, d, d) * 4, "w"), numpy_helper.from_array(_w(rng, d), "b")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h0"]),
            helper.make_node("Loop", ["trips", "cond", "h0"], ["y"], body=body),
        ],
        "loop_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])],
        initializer=[
            numpy_helper.from_array(_w(rng, d, d), "w"),
            numpy_helper.from_array(np.array(3, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    return _save(_model(graph), dir, "loop_weights")


def make_scan_weights(dir: Path) -> Path:
    """Scan over the rows of x [seq, 64] whose body holds its weight: h <- tanh((x_t + h) @ w); y_t = h."""
    rng, d = _rng(23), SUBGRAPH_D
    body = helper.make_graph(
        [
            helper.make_node("Add", ["x_t", "h_in"], ["s"]),
            helper.make_node("MatMul", ["s", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["h_out"]),
            helper.make_node("Identity", ["h_out"], ["y_t"]),
        ],
        "scan_body",
        [
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [d]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [d]),
        ],
        [
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [d]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [d]),
        ],
        initializer=[numpy_helper.from_array(_w(rng, d, d) * 4, "w")],
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["h0", "x"], ["h", "y"], body=body, num_scan_inputs=1)],
        "scan_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", d])],
        [
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [d]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", d]),
        ],
        initializer=[numpy_helper.from_array(_w(rng, d), "h0")],
    )
    return _save(_model(graph), dir, "scan_weights")


# (name, factory, profile): models with weights in subgraphs; flag inputs are fixed scalars.
SUBGRAPH_BUNDLABLE: list[tuple[str, Callable[[Path], Path], ProfileDict]] = [
    ("if_weights", make_if_weights, {"x": _batch((SUBGRAPH_D,))}),
    ("nested_if", make_nested_if, {"x": _batch((SUBGRAPH_D,))}),
    ("loop_weights", make_loop_weights, {"x": _batch((SUBGRAPH_D,))}),
    ("scan_weights", make_scan_weights, {"x": _batch((SUBGRAPH_D,))}),
]


# --------------------------------------------------------------------------- manifest JSON edits in tests
def frame_digest(doc: Mapping, stored: bytes) -> str:
    """The digest a manifest dict pins a frame's stored bytes by (its weights.frame_digest: blake3 or sha256)."""
    from runtime_shim.store.digest import digest_function

    return digest_function(doc["weights"].get("frame_digest", "sha256"))(stored)


def model0(doc: Mapping) -> dict:
    """The first (in these tests, only) model of a schema 2 manifest dict."""
    return doc["models"][0]
