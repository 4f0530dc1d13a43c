"""ONNX handling: loading (external data, typed fields, errors), Constant hoisting, and skeletons that run like the original."""

from __future__ import annotations

import shutil
from pathlib import Path

import models
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bundler.onnx_model import load_model, make_skeleton, write_normalized_model
from bundler.store_writer import write_weight_store
from runtime_shim.errors import ModelError
from runtime_shim.store.reader import WeightReader


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _silero_feeds(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    feeds = {}
    for vi in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name == "sr":
            feeds["sr"] = np.array(16000, dtype=np.int64)
        elif vi.name == "input":
            feeds["input"] = (rng.standard_normal((1, 576)) * 0.1).astype(np.float32)
        else:  # recurrent state: zeros, with batch 1 for unknown dims
            feeds[vi.name] = np.zeros([d or 1 for d in dims], dtype=np.float32)
    return feeds


def _bundle_and_unpack(model, tmp: Path) -> Path:
    """Weight store + skeleton, then the shim's path: skeleton file beside WeightReader.unpack_raw's output."""
    store = write_weight_store(model.weights, tmp / "bundle")
    out = tmp / "unpacked"
    out.mkdir()
    (out / "model.onnx").write_bytes(make_skeleton(model, store, "weights.bin"))
    with WeightReader(tmp / "bundle", store) as reader:
        reader.unpack_raw(out / "weights.bin")
    return out / "model.onnx"


# --------------------------------------------------------------------------- round trips through the skeleton
@pytest.mark.parametrize("name,factory,profile", models.ALL_BUNDLABLE, ids=[m[0] for m in models.ALL_BUNDLABLE])
def test_skeleton_plus_unpacked_weights_runs_like_the_original(tmp_path: Path, name, factory, profile) -> None:
    src = factory(tmp_path / "src")
    model = load_model(src)
    skeleton = _bundle_and_unpack(model, tmp_path)
    onnx.load(str(skeleton))  # onnx's loader accepts it, external data and all
    feeds = models.sample_inputs(name, profile, src)
    for want, got in zip(_run(src, feeds), _run(skeleton, feeds)):
        assert want.dtype == got.dtype and np.array_equal(want, got)


def test_silero_models_round_trip_through_skeleton(silero_models: dict[str, Path], tmp_path: Path) -> None:
    for name, src in silero_models.items():
        model = load_model(src)
        skeleton = _bundle_and_unpack(model, tmp_path / name)
        feeds = _silero_feeds(src)
        for want, got in zip(_run(src, feeds), _run(skeleton, feeds)):
            assert np.array_equal(want, got), name


def test_silero_if_subgraph_constants_become_initializers(silero_models: dict[str, Path]) -> None:
    model = load_model(silero_models["silero_vad"])  # every weight sits in Constant nodes inside If branches
    assert model.constants_hoisted == len(model.weights) > 300
    names = {w.name for w in model.weights}
    assert any("stft.forward_basis_buffer" in n for n in names)

    def constants(g: onnx.GraphProto) -> int:
        n = sum(node.op_type == "Constant" for node in g.node)
        return n + sum(constants(a.g) for node in g.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)

    assert constants(model.proto.graph) == 0
    assert [(t.name, t.dtype) for t in model.inputs] == [("input", "float32"), ("state", "float32"), ("sr", "int64")]
    assert model.inputs[0].shape == ("dim_input_0", "dim_input_1")  # unnamed dynamic dims get stable names


def test_skeleton_is_deterministic_and_weightless(silero_models: dict[str, Path], tmp_path: Path) -> None:
    a, b = load_model(silero_models["silero_vad_16k_op15"]), load_model(silero_models["silero_vad_16k_op15"])
    store = write_weight_store(a.weights, tmp_path)
    skel = make_skeleton(a, store, "weights.bin")
    assert skel == make_skeleton(b, store, "weights.bin")
    assert len(skel) < store.raw_size // 10
    ext = [t for t in onnx.load_from_string(skel).graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert ext and all({e.key: e.value for e in t.external_data}["location"] == "weights.bin" for t in ext)


def test_normalized_model_dir_parses_in_trt_rtx(silero_models: dict[str, Path], tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt_rtx")
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)

    def parses(path: Path) -> bool:
        builder = trt.Builder(logger)
        network = builder.create_network()  # keep every object alive while the parser runs
        parser = trt.OnnxParser(network, logger)
        return bool(parser.parse_from_file(str(path)))

    for src in (models.make_conv(tmp_path / "conv"), silero_models["silero_vad"]):
        model = load_model(src)
        store = write_weight_store(model.weights, tmp_path / src.stem / "bundle")
        assert parses(write_normalized_model(model, store, tmp_path / src.stem / "norm"))
    assert not parses(models.make_unsupported(tmp_path / "bad"))  # the factory really is unparseable


# --------------------------------------------------------------------------- normalization
def test_constant_nodes_become_initializers_with_the_same_values(tmp_path: Path) -> None:
    src = models.make_constants(tmp_path)
    original = {n.output[0]: n for n in onnx.load(str(src)).graph.node if n.op_type == "Constant"}
    model = load_model(src)
    assert model.constants_hoisted == 5
    assert not [n for n in model.proto.graph.node if n.op_type == "Constant"]
    assert [t.name for t in model.proto.graph.initializer] == list(original)
    for w in model.weights:
        attr = original[w.name].attribute[0]
        if attr.name == "value":
            want = numpy_helper.to_array(attr.t)
        elif attr.name == "value_float":
            want = np.array(attr.f, dtype=np.float32)
        else:
            want = np.array(list(attr.ints), dtype=np.int64)
        assert w.shape == want.shape and bytes(w.data) == want.tobytes(), w.name
    assert model.weight("scale").dtype == "float32" and model.weight("out_shape").dtype == "int64"


def test_typed_field_tensors_read_right(tmp_path: Path) -> None:
    src = models.make_typed_fields(tmp_path)
    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    model = load_model(src)
    for w in model.weights:
        want = expected[w.name]
        assert bytes(w.data) == want.astype(want.dtype.newbyteorder("<")).tobytes(), w.name
    assert [w.dtype for w in model.weights] == ["float32", "float16", "int64"]


def test_io_specs_and_dynamic_dims(tmp_path: Path) -> None:
    conv = load_model(models.make_conv(tmp_path))
    assert [(t.name, t.dtype, t.shape) for t in conv.inputs] == [("input", "float32", ("batch", 3, "height", "width"))]
    assert [(t.name, t.shape) for t in conv.outputs] == [("logits", ("batch", 10))]
    assert conv.inputs[0].dynamic_axes == (0, 2, 3)
    fixed = load_model(models.make_fixed(tmp_path))
    assert fixed.inputs[0].shape == (2, 64) and fixed.inputs[0].dynamic_axes == ()
    fp16 = load_model(models.make_mlp_fp16(tmp_path))
    assert fp16.inputs[0].dtype == "float16" and {w.dtype for w in fp16.weights} == {"float16"}
    assert len(conv.source_sha256) == 64 and conv.opset == models.OPSET


def test_placeholder_dims_get_names_of_their_own(tmp_path: Path) -> None:
    """An empty or "?" dim_param ties no axes: named per axis on the graph's I/O, cleared inside, ONNX Runtime runs it."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["", "?", None])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["?", "?", None])
    inner = onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, ["?", "?", None])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["h"]), onnx.helper.make_node("Neg", ["h"], ["y"])],
        "g",
        [x],
        [y],
        value_info=[inner],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    path = tmp_path / "placeholders.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    assert loaded.inputs[0].shape == ("dim_x_0", "dim_x_1", "dim_x_2")  # the unnamed axis kept its old name
    assert loaded.outputs[0].shape == ("dim_y_0", "dim_y_1", "dim_y_2")
    assert loaded.renamed_dims == {"dim_x_0": "", "dim_x_1": "?", "dim_y_0": "?", "dim_y_1": "?"}
    g = loaded.proto.graph
    assert [d.dim_param for d in g.input[0].type.tensor_type.shape.dim] == ["dim_x_0", "dim_x_1", ""]
    assert not any(d.dim_param for d in g.value_info[0].type.tensor_type.shape.dim)
    store = write_weight_store(loaded.weights, tmp_path / "store")
    skeleton = write_normalized_model(loaded, store, tmp_path / "norm")
    a = np.random.default_rng(0).standard_normal((2, 5, 3)).astype(np.float32)
    (got,) = ort.InferenceSession(str(skeleton), providers=["CPUExecutionProvider"]).run(None, {"x": a})
    np.testing.assert_array_equal(got, -np.maximum(a, 0))


# --------------------------------------------------------------------------- external data
def test_external_data_model_loads(tmp_path: Path) -> None:
    src = models.make_external(tmp_path)
    full = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    model = load_model(src)
    assert {w.name: bytes(w.data) for w in model.weights} == {k: v.tobytes() for k, v in full.items()}
    assert all(not t.external_data and not t.raw_data for t in model.proto.graph.initializer)


def test_missing_external_data_names_both_files(tmp_path: Path) -> None:
    src = models.make_external(tmp_path)
    (tmp_path / models.EXTERNAL_DATA_NAME).unlink()
    with pytest.raises(ModelError) as e:
        load_model(src)
    assert str(src) in str(e.value) and models.EXTERNAL_DATA_NAME in str(e.value) and "not found" in str(e.value)


def test_truncated_external_data_is_refused(tmp_path: Path) -> None:
    src = models.make_external(tmp_path)
    data = tmp_path / models.EXTERNAL_DATA_NAME
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match="outside"):
        load_model(src)


def test_external_data_outside_the_model_dir_is_refused(tmp_path: Path) -> None:
    src = models.make_external(tmp_path / "m")
    proto = onnx.load(str(src), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../" + models.EXTERNAL_DATA_NAME
    shutil.copy(tmp_path / "m" / models.EXTERNAL_DATA_NAME, tmp_path / models.EXTERNAL_DATA_NAME)
    onnx.save_model(proto, str(src))
    with pytest.raises(ModelError, match="relative path inside"):
        load_model(src)


# --------------------------------------------------------------------------- not a model
@pytest.mark.parametrize(
    "content", [b"", b"hello, I am a text file\n", bytes(range(256)) * 4], ids=["empty", "text", "binary"]
)
def test_not_an_onnx_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=f"{path}: not an ONNX model.*ONNX ModelProto"):
        load_model(path)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found; expected an ONNX model"):
        load_model(tmp_path / "nope.onnx")


def test_constants_sharing_a_name_in_sibling_branches_stay_in_place(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    def branch(tag: str, value: float) -> onnx.GraphProto:
        nodes = [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.full((4,), value, np.float32))),
            helper.make_node(
                "Constant", [], [f"w_{tag}"], value=numpy_helper.from_array(np.arange(4, dtype=np.float32) * value)
            ),
            helper.make_node("Add", ["x", "c"], ["t"]),
            helper.make_node("Mul", ["t", f"w_{tag}"], [f"y_{tag}"]),
        ]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(f"y_{tag}", TensorProto.FLOAT, [4])])

    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", 3.0))],
        "siblings",
        [
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    src = tmp_path / "siblings.onnx"
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    proto.ir_version = models.IR_VERSION
    onnx.save_model(proto, str(src))
    model = load_model(src)
    assert sorted(w.name for w in model.weights) == ["w_else", "w_then"]  # "c" is defined twice: left in place
    skeleton = _bundle_and_unpack(model, tmp_path)
    for flag in (True, False):
        feeds = {"flag": np.array(flag), "x": np.arange(4, dtype=np.float32)}
        assert np.array_equal(_run(src, feeds)[0], _run(skeleton, feeds)[0])


def test_negative_dim_values_read_as_unnamed_dynamic_dims(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "negative",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "?"])],
    )
    src = tmp_path / "negative.onnx"
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    proto.ir_version = models.IR_VERSION
    onnx.save_model(proto, str(src))
    model = load_model(src)  # some exporters (paddle2onnx) write -1 for "any size"; ONNX Runtime reads it so
    assert model.inputs[0].shape == ("dim_x_0", 3, "dim_x_2")
    assert all(d.dim_value >= 0 for d in model.proto.graph.input[0].type.tensor_type.shape.dim)
