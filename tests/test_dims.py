"""Dims as users think of them: shared dim ranges, placeholder dims made distinct, profiles checked before TRT-RTX.

Real ONNX models made here with onnx.helper, real TRT-RTX AOT builds of weightful engines (no GPU needed), and
the bundles run through the shim's ONNX Runtime fallback against ONNX Runtime on the original model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime_shim
from bundler.build import build_bundle
from bundler.config import ConfigError, DimRange, make_options, parse_shape_args
from bundler.config_file import load_config
from bundler.dims import fit_warmups, resolve_profiles
from bundler.onnx_model import load_model
from runtime_shim.errors import EngineBuildError, InputError
from runtime_shim.manifest import TensorSpec, read_manifest
from runtime_shim.session import validate_inputs
from runtime_shim.trt.build import BuildRequest, build_engine
from tests.models import IR_VERSION, OPSET

SMS = [89]  # one target keeps the AOT builds short


def no_gpu() -> SimpleNamespace:
    return SimpleNamespace(gpus=())


def _save(graph: onnx.GraphProto, dir: Path, name: str) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="trtx-bundler-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / f"{name}.onnx"
    onnx.save_model(model, str(path))
    return path


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


# --------------------------------------------------------------------------- models
TRANSFORMER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def make_transformer(dir: Path) -> Path:
    """Four int64 inputs [batch, seq_len] (a BERT-like embedding block) -> hidden [batch, seq_len, 16]."""
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(_w(rng, 100, 16), "word_embeddings"),
        numpy_helper.from_array(_w(rng, 2, 16), "token_type_embeddings"),
        numpy_helper.from_array(_w(rng, 128, 16), "position_embeddings"),
        numpy_helper.from_array(_w(rng, 16, 16), "dense.weight"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["we"]),
        helper.make_node("Gather", ["token_type_embeddings", "token_type_ids"], ["te"]),
        helper.make_node("Gather", ["position_embeddings", "position_ids"], ["pe"]),
        helper.make_node("Add", ["we", "te"], ["e1"]),
        helper.make_node("Add", ["e1", "pe"], ["e2"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last_axis"], ["mask3"]),
        helper.make_node("Mul", ["e2", "mask3"], ["masked"]),
        helper.make_node("MatMul", ["masked", "dense.weight"], ["hidden"]),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq_len"]) for n in TRANSFORMER_INPUTS],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq_len", 16])],
        initializer=inits,
    )
    return _save(graph, dir, "transformer")


def make_placeholder_image(dir: Path) -> Path:
    """pixels ["?", 3, "?", "?"]: one placeholder for batch, height and width, as some exporters write."""
    rng = np.random.default_rng(8)
    inits = [
        numpy_helper.from_array(_w(rng, 4, 3, 3, 3), "conv.weight"),
        numpy_helper.from_array(_w(rng, 10, 4), "fc.weight"),
        numpy_helper.from_array(_w(rng, 10), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["pixels", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "placeholder_image",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["?", 3, "?", "?"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["?", 10])],
        initializer=inits,
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, ["?", 4, "?", "?"])],
    )
    return _save(graph, dir, "placeholder_image")


def make_reused_name(dir: Path) -> Path:
    """Two unrelated inputs a [N, 8] and b [N, 4] whose exporter named both first axes "N"."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array(_w(rng, 8, 6), "wa"), numpy_helper.from_array(_w(rng, 4, 6), "wb")]
    nodes = [helper.make_node("MatMul", ["a", "wa"], ["ya"]), helper.make_node("MatMul", ["b", "wb"], ["yb"])]
    graph = helper.make_graph(
        nodes,
        "reused_name",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 8]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("ya", TensorProto.FLOAT, ["N", 6]),
            helper.make_tensor_value_info("yb", TensorProto.FLOAT, ["N", 6]),
        ],
        initializer=inits,
    )
    return _save(graph, dir, "reused_name")


def transformer_inputs(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(0, 100, (batch, seq), dtype=np.int64),
        "attention_mask": rng.integers(0, 2, (batch, seq), dtype=np.int64),
        "token_type_ids": rng.integers(0, 2, (batch, seq), dtype=np.int64),
        "position_ids": np.tile(np.arange(seq, dtype=np.int64), (batch, 1)),
    }


def run_both(model: Path, bundle: Path, feeds: dict[str, np.ndarray], cache: Path) -> None:
    """The bundle through the shim (ONNX Runtime fallback on the skeleton) equals ONNX Runtime on the original."""
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    with runtime_shim.load(bundle, "T", cache_dir=cache) as session:
        got = session.run(feeds)
    assert len(got) == len(want)
    for w, g in zip(want, got.values()):
        np.testing.assert_array_equal(g, w)


def _options(**kw: object) -> object:
    kw.setdefault("sms", SMS)
    return make_options(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- shared dims
def test_transformer_builds_from_one_range_per_dim(tmp_path: Path) -> None:
    model = make_transformer(tmp_path / "m")
    out = tmp_path / "bundle"
    result = build_bundle(model, out, options=_options(dims=["batch=1:2:4", "seq_len=1:16:64"]), probe=no_gpu)
    manifest = result.manifest
    assert [e.kind for e in manifest.engines] == ["weightful"]  # a real TRT-RTX AOT build accepted the profile
    (profile,) = manifest.profiles
    assert set(profile.shapes) == set(TRANSFORMER_INPUTS)
    assert {(r.min, r.opt, r.max) for r in profile.shapes.values()} == {((1, 1), (2, 16), (4, 64))}
    run_both(model, out, transformer_inputs(3, 20), tmp_path / "cache")


def test_one_whole_input_gives_the_shared_dims_to_the_others(tmp_path: Path) -> None:
    model = make_transformer(tmp_path / "m")
    options = _options(shapes=["input_ids=1x1:2x16:4x64", "input_ids=4x64:8x96:8x128"], weightful=False)
    manifest = build_bundle(model, tmp_path / "b", options=options, probe=no_gpu).manifest
    assert len(manifest.profiles) == 2
    for profile, want in zip(manifest.profiles, [((1, 1), (2, 16), (4, 64)), ((4, 64), (8, 96), (8, 128))]):
        assert {n: (r.min, r.opt, r.max) for n, r in profile.shapes.items()} == dict.fromkeys(TRANSFORMER_INPUTS, want)


def test_missing_ranges_reported_at_once_with_a_dim_line(tmp_path: Path) -> None:
    model = make_transformer(tmp_path / "m")
    with pytest.raises(ConfigError) as e:
        build_bundle(model, tmp_path / "b", options=_options(), probe=no_gpu)
    message = str(e.value)
    assert "no range for the dynamic dims batch, seq_len" in message
    assert all(f"input {n!r} has dynamic dims [batch, seq_len]" in message for n in TRANSFORMER_INPUTS)
    assert "pass --dim batch=1:8:64 --dim seq_len=1:8:64 " in e.value.hint
    # The same dims get the same suggested range in every input's --shape alternative.
    assert all(f"--shape {n}=1x1:8x8:64x64" in e.value.hint for n in TRANSFORMER_INPUTS)
    assert not (tmp_path / "b").exists()


def test_suggestions_reuse_the_ranges_given_for_shared_dims() -> None:
    a = TensorSpec(name="a", dtype="float32", shape=("batch", "seq_len"))
    b = TensorSpec(name="b", dtype="float32", shape=("batch", "seq_len", "feat"))
    with pytest.raises(ConfigError) as e:
        resolve_profiles([a, b], parse_shape_args(["a=1x1:2x16:4x64"]), source="m.onnx")
    assert "no range for the dynamic dim feat;" in str(e.value) and "input 'b'" in str(e.value)
    assert "pass --dim feat=1:8:64 " in e.value.hint and "--shape b=1x1x1:2x16x8:4x64x64" in e.value.hint


@pytest.mark.parametrize("weightful", [True, False])
def test_contradictory_ranges_are_refused_before_any_build(tmp_path: Path, weightful: bool) -> None:
    model = make_transformer(tmp_path / "m")
    shapes = ["input_ids=1x1:2x16:4x64", "attention_mask=1x1:2x32:4x64"]
    with pytest.raises(ConfigError) as e:
        build_bundle(model, tmp_path / "b", options=_options(shapes=shapes, weightful=weightful), probe=no_gpu)
    message = str(e.value)
    assert "dim 'seq_len' has different ranges" in message
    assert "input 'input_ids' axis 1 = 1:16:64" in message and "input 'attention_mask' axis 1 = 1:32:64" in message
    assert "--dim seq_len=1:16:64" in e.value.hint
    assert not (tmp_path / "b").exists()
    # A --dim and a --shape that disagree are named too.
    with pytest.raises(ConfigError, match=r"--dim/\[dims\] seq_len = 1:8:64, input 'input_ids' axis 1 = 1:16:64"):
        build_bundle(
            model,
            tmp_path / "b",
            options=_options(shapes=shapes[:1], dims=["seq_len=1:8:64"], weightful=weightful),
            probe=no_gpu,
        )


def test_profile_checks_before_trt_rtx() -> None:
    image = TensorSpec(name="x", dtype="float32", shape=("n", "n"))  # one dim twice: a square input
    with pytest.raises(ConfigError, match=r"axis 0 \(dim 'n'\): sizes must be >= 1, got 0:1:4"):
        resolve_profiles([image], parse_shape_args(["x=0x0:1x1:4x4"]), source="m")
    with pytest.raises(ConfigError, match="dim 'n' has different ranges"):
        resolve_profiles([image], parse_shape_args(["x=1x1:2x3:4x4"]), source="m")
    with pytest.raises(ConfigError, match=r"--dim/\[dims\] 'm': the model's inputs have no dynamic dim") as e:
        resolve_profiles([image], (), {"m": (DimRange(1, 2, 3),)}, source="m")
    assert "n (x axis 0, x axis 1)" in e.value.hint


# --------------------------------------------------------------------------- placeholder and reused names
def test_placeholder_dims_become_distinct(tmp_path: Path) -> None:
    model_path = make_placeholder_image(tmp_path / "m")
    loaded = load_model(model_path)
    names = ("dim_pixels_0", 3, "dim_pixels_2", "dim_pixels_3")
    assert loaded.inputs[0].shape == names and loaded.outputs[0].shape == ("dim_logits_0", 10)
    graph = loaded.proto.graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == list(names)
    assert not any(d.dim_param for vi in graph.value_info for d in vi.type.tensor_type.shape.dim)

    # TRT-RTX on the original: one dim "?" cannot be 224 and 320 at once.
    fixed = {"pixels": ((1, 3, 224, 320),) * 3}
    with pytest.raises(EngineBuildError, match="Input dimensions with this name have different constant values"):
        build_engine(BuildRequest(onnx_path=str(model_path), profiles=[fixed], compute_capabilities=SMS))

    out = tmp_path / "bundle"
    result = build_bundle(model_path, out, options=_options(shapes=["pixels=1x3x224x320"]), probe=no_gpu)
    assert [e.kind for e in result.manifest.engines] == ["weightful"]
    assert any("dim '?' (a placeholder) is built as distinct dims" in n for n in result.notes)
    manifest, _ = read_manifest(out)
    assert manifest.inputs[0].shape == names
    skeleton = onnx.load_model_from_string((out / manifest.skeleton.file.path).read_bytes())
    assert [d.dim_param or d.dim_value for d in skeleton.graph.input[0].type.tensor_type.shape.dim] == list(names)
    feeds = {"pixels": np.random.default_rng(1).standard_normal((1, 3, 224, 320)).astype(np.float32)}
    assert validate_inputs(manifest, feeds) == 0  # height != width is fine for the shim now
    run_both(model_path, out, feeds, tmp_path / "cache")

    # Each axis takes its own --dim; the placeholder itself is no dim.
    dims = ["dim_pixels_0=1:1:2", "dim_pixels_2=32:224:256", "dim_pixels_3=32:320:512"]
    build_bundle(model_path, tmp_path / "b2", options=_options(dims=dims, weightful=False), probe=no_gpu)
    with pytest.raises(ConfigError, match=r"'\?': the model's inputs have no dynamic dim") as e:
        build_bundle(model_path, tmp_path / "b3", options=_options(dims=["?=1:2:4"]), probe=no_gpu)
    assert "'?' names unrelated axes in this model, so each has its own name" in e.value.hint


def test_a_name_with_ranges_no_size_fits_is_made_distinct(tmp_path: Path) -> None:
    model_path = make_reused_name(tmp_path / "m")
    shapes = ["a=1x8:2x8:4x8", "b=16x4:32x4:64x4"]  # no single N fits both: the exporter reused the name
    with pytest.raises(EngineBuildError, match="contradictory IOptimizationProfile"):  # TRT-RTX on the model as it is
        build_engine(
            BuildRequest(
                onnx_path=str(model_path),
                profiles=[{"a": ((1, 8), (2, 8), (4, 8)), "b": ((16, 4), (32, 4), (64, 4))}],
                compute_capabilities=SMS,
            )
        )
    out = tmp_path / "bundle"
    result = build_bundle(model_path, out, options=_options(shapes=shapes), probe=no_gpu)
    assert [e.kind for e in result.manifest.engines] == ["weightful"]
    assert [t.shape for t in result.manifest.inputs] == [("dim_a_0", 8), ("dim_b_0", 4)]
    assert any(
        "dim 'N' (given ranges no single size fits) is built as distinct dims: dim_a_0, dim_b_0" in n
        for n in result.notes
    )
    rng = np.random.default_rng(2)
    feeds = {"a": rng.standard_normal((3, 8)).astype(np.float32), "b": rng.standard_normal((40, 4)).astype(np.float32)}
    run_both(model_path, out, feeds, tmp_path / "cache")

    # Overlapping but different ranges are a mistake, not a reuse: refused, with or without the weightful engine.
    for weightful in (True, False):
        with pytest.raises(ConfigError, match="dim 'N' has different ranges"):
            build_bundle(
                model_path,
                tmp_path / "b2",
                options=_options(shapes=["a=1x8:2x8:8x8", "b=1x4:4x4:8x4"], weightful=weightful),
                probe=no_gpu,
            )


def test_shared_dims_stay_one_dim_for_the_shim(tmp_path: Path) -> None:
    model = make_transformer(tmp_path / "m")
    out = tmp_path / "b"
    build_bundle(model, out, options=_options(dims=["batch=1:2:4", "seq_len=1:16:64"], weightful=False), probe=no_gpu)
    manifest, _ = read_manifest(out)
    feeds = transformer_inputs(2, 8)
    feeds["attention_mask"] = feeds["attention_mask"][:, :5]
    with pytest.raises(InputError, match="'seq_len'"):
        validate_inputs(manifest, feeds)


def test_profile_counts_must_agree() -> None:
    x = TensorSpec(name="x", dtype="float32", shape=("n", "m"))
    two = {"n": (DimRange(1, 2, 4), DimRange(4, 8, 16)), "m": (DimRange(3, 3, 3),)}
    profiles = resolve_profiles([x], (), two, source="m")
    assert [p.shapes["x"].max for p in profiles] == [(4, 3), (16, 3)]
    with pytest.raises(ConfigError, match="3 profiles, but dim 'n' is given 2 times"):
        resolve_profiles([x], (), {**two, "m": (DimRange(3, 3, 3),) * 3}, source="m")


def test_warmups_written_for_another_model_follow_the_profiles(tmp_path: Path) -> None:
    """A shared bundle.toml whose [[warmup]] names another model's input: left out, with a note."""
    model = make_placeholder_image(tmp_path / "m")
    config = tmp_path / "bundle.toml"
    config.write_text(
        '[dims]\ndim_pixels_0 = "1:2:4"\ndim_pixels_2 = "32:64:128"\ndim_pixels_3 = "32:64:128"\n'
        '[[warmup]]\ninput = "1x3x224x224"\n'
    )
    options = make_options(load_config(config), weightful=False)
    result = build_bundle(model, tmp_path / "b", options=options, probe=no_gpu)
    assert result.manifest.warmup_shapes == ()
    assert any("name none of the model's inputs (input); left out" in n for n in result.notes)
    # Warm-ups that name the model's inputs are checked as before: a stray name among them is an error.
    pixels = TensorSpec(name="pixels", dtype="float32", shape=("n", 3))
    profiles = resolve_profiles([pixels], (), {"n": (DimRange(1, 2, 4),)}, source="m")
    assert fit_warmups([pixels], profiles, [{"pixels": (2, 3)}], source="m") == ({"pixels": (2, 3)},)
    with pytest.raises(ConfigError, match="warmup\\[1\\].input: no model input named 'input'"):
        fit_warmups([pixels], profiles, [{"pixels": (2, 3)}, {"input": (2, 3)}], source="m")
    with pytest.raises(ConfigError, match="outside every profile's range"):
        fit_warmups([pixels], profiles, [{"pixels": (8, 3)}], source="m")
