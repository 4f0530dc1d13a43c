"""Several models in one bundle, from the build side: the CLI's files, names and prefixed shapes, [[model]] tables,
one weight store whose shared tensors are stored once, reproducible bytes, and failures that leave nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bundler.build import ModelSpec, build_bundle
from bundler.bundle_io import verify_bundle
from bundler.cli import main
from bundler.config import BuildOptions, ConfigError
from bundler.config_file import load_config
from bundler.model_options import plan_models
from bundler.store_sharing import store_sharing
from runtime_shim.errors import ModelError
from runtime_shim.manifest import read_bundle_manifest
from runtime_shim.store.reader import WeightReader
from tests import models

NO_ENGINES = BuildOptions(weightful=False, weightless=False)
# conv's dims (height and width are conv's alone: no prefix needed) and mlp's input
SHAPES = (
    "--dim",
    "conv.batch=1:2:4",
    "--dim",
    "height=8:16:32",
    "--dim",
    "width=8:16:32",
    "--shape",
    "mlp.x=1x64:2x64:8x64",
)


def run(*args: str | Path) -> SimpleNamespace:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return SimpleNamespace(code=r.exit_code, out=r.stdout, err=r.stderr)


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    """Three different graphs: conv [batch,3,height,width], mlp [batch,64], fixed [2,64]."""
    folder = tmp_path / "models"
    return [models.make_conv(folder), models.make_mlp(folder), models.make_fixed(folder)]


def renamed_input(src: Path, dst: Path, new: str) -> Path:
    """``src`` with its one graph input renamed ``new`` (names with dots, as exporters write them)."""
    model = onnx.load(str(src))
    old = model.graph.input[0].name
    model.graph.input[0].name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def fine_tune(src: Path, dst: Path, seed: int) -> Path:
    """``src`` with new values for its last layer (fc2), every other initializer kept byte for byte."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.name.startswith("fc2."):
            arr = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((rng.standard_normal(arr.shape) * 0.05).astype(arr.dtype), init.name))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_three_models_named_after_their_files(three: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ocr"
    r = run("build", *three, "-o", out, *SHAPES, "--no-weightful", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert [m["name"] for m in summary["models"]] == ["conv", "mlp", "fixed"]
    assert summary["model"] is None and summary["bundle"] == str(out)
    conv, mlp, fixed = summary["models"]
    assert conv["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, "height", "width"]}]
    assert (conv["profiles"], mlp["profiles"], fixed["profiles"]) == (1, 1, 0)
    assert all(m["engines"] == [] and m["parse"] is None for m in summary["models"])
    w = summary["weights"]
    assert w["blobs"] == 6 + 4 + 4 and w["shared_blobs"] == 0 and w["saved_raw_bytes"] == 0
    assert w["raw_bytes"] == summary["raw_weight_bytes"] == sum(m["raw_weight_bytes"] for m in summary["models"])
    bundle, warnings, _ = read_bundle_manifest(out)
    assert warnings == [] and bundle.names == ("conv", "mlp", "fixed") and verify_bundle(out) == []
    assert len({m.skeleton.file.path for m in bundle.models}) == 3  # each model its own skeleton
    assert bundle.view("mlp").profiles[0].shapes["x"].max == (8, 64)
    # The human summary names every model and what they share.
    human = run("build", *three, "-o", tmp_path / "h", *SHAPES, "--no-weightful")
    assert human.code == 0, human.err
    for text in (
        "weights:",
        "shared: no tensor is in more than one model",
        "model conv (version 0): inputs input",
        "model fixed (version 0): inputs x [2, 64]; 0 profile(s)",
        "engines: none",
    ):
        assert text in human.out, text


def test_names_and_versions_from_flags(three: list[Path], tmp_path: Path) -> None:
    names = ("--name", "det", "--name", "cls", "--name", "rec", "--model-version", "2.1")
    shapes = (
        "--shape",
        "cls.x=1x64:2x64:8x64",
        "--dim",
        "det.batch=1:2:4",
        "--dim",
        "height=8:16:32",
        "--dim",
        "width=8:16:32",
    )
    r = run("build", *three, "-o", tmp_path / "a", *names, *shapes, "--no-weightful")
    assert r.code == 0, r.err
    bundle, _, _ = read_bundle_manifest(tmp_path / "a")
    assert bundle.names == ("det", "cls", "rec") and {m.version for m in bundle.models} == {"2.1"}
    # One version per file.
    specs = plan_models(None, three, versions=["1", "2", "3"]).specs
    assert [s.version for s in specs] == ["1", "2", "3"] and [s.name for s in specs] == ["conv", "mlp", "fixed"]
    # Counts that fit no rule are refused before anything is read.
    bad = run("build", *three, "-o", tmp_path / "b", "--name", "det", "--name", "cls")
    assert bad.code == 1 and "--name given 2 time(s) for 3 model(s)" in bad.err and "once per file" in bad.err
    bad = run("build", *three, "-o", tmp_path / "b", "--model-version", "1", "--model-version", "2")
    assert bad.code == 1 and "--model-version given 2 times for 3 models" in bad.err
    assert not (tmp_path / "b").exists()
    # One file and one --name: the single-model form, as it always was.
    one = run("build", three[2], "-o", tmp_path / "one", "--name", "solo", "--no-weightful", "--json")
    assert one.code == 0 and json.loads(one.out)["model"] == "solo"


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    a = models.make_fixed(tmp_path / "a")
    b = models.make_fixed(tmp_path / "b")
    r = run("build", a, b, "-o", tmp_path / "out", "--no-weightful")
    assert r.code == 1 and "two models would be named 'fixed'" in r.err and "--name" in r.err
    r = run("build", a, models.make_mlp(tmp_path), "-o", tmp_path / "out", "--name", "m", "--name", "m")
    assert r.code == 1 and "two models would be named 'm'" in r.err
    assert not (tmp_path / "out").exists()


def test_fine_tunes_store_shared_tensors_once(tmp_path: Path) -> None:
    base = models.make_mlp(tmp_path / "src")
    a, b = fine_tune(base, tmp_path / "ft_a.onnx", 1), fine_tune(base, tmp_path / "ft_b.onnx", 2)
    profiles = models.as_profiles({"x": ((1, 64), (2, 64), (4, 64))})
    built = build_bundle(
        None,
        tmp_path / "out",
        options=NO_ENGINES,
        models=[ModelSpec(source=a, profiles=profiles), ModelSpec(source=b, profiles=profiles)],
    )
    bundle = built.bundle
    assert len(bundle.weights.blobs) == 4 + 2  # fc1.weight and fc1.bias once, each model's fc2 on its own
    s = store_sharing(bundle)
    shared = initializers(a)["fc1.weight"].nbytes + initializers(a)["fc1.bias"].nbytes
    assert (s.shared_blobs, s.shared_raw_bytes, s.saved_raw_bytes) == (2, shared, shared)
    assert s.saved_stored_bytes > 0 and [m.blobs for m in s.models] == [4, 4]
    by_name = {m.name: {t.name: t.blob for t in m.tensors} for m in bundle.models}
    assert by_name["ft_a"]["fc1.weight"] == by_name["ft_b"]["fc1.weight"]
    assert by_name["ft_a"]["fc2.weight"] != by_name["ft_b"]["fc2.weight"]
    for name, path in (("ft_a", a), ("ft_b", b)):
        view = bundle.view(name)
        with WeightReader(built.bundle_dir, view.weights) as reader:
            for tensor, want in initializers(path).items():
                np.testing.assert_array_equal(reader.read_tensor(tensor), want)
    assert verify_bundle(built.bundle_dir) == []


def test_shapes_with_and_without_the_model_prefix(three: list[Path], tmp_path: Path) -> None:
    conv, mlp, fixed = three
    dotted = renamed_input(mlp, tmp_path / "dot" / "dotted.onnx", "input.1")

    def build(*args: str, files: list[Path] = three) -> SimpleNamespace:
        return run("build", *files, "-o", tmp_path / "out", "--no-weightful", *args)

    # A dim two models have needs the prefix; the error names them and the spelling to use.
    r = build("--dim", "batch=1:2:4")
    assert r.code == 1 and "2 models have a dynamic dim named 'batch': conv, mlp" in r.err
    assert "conv.batch or mlp.batch" in r.err
    r = build("--shape", "x=1x64")
    assert r.code == 1 and "2 models have an input named 'x': mlp, fixed" in r.err
    # An unknown prefix lists the models and their inputs.
    r = build("--shape", "nope.x=1x64")
    assert r.code == 1 and "no model named 'nope'" in r.err and "the models are conv, mlp, fixed" in r.err
    assert "mlp: x" in r.err
    r = build("--shape", "mlp.y=1x64")
    assert r.code == 1 and "model 'mlp' has no input named 'y'" in r.err
    assert not (tmp_path / "out").exists()
    # Several profiles per model: the k-th --shape of an input is that model's profile k.
    r = build(
        *SHAPES[:6],
        *("--shape", "mlp.x=1x64:2x64:4x64", "--shape", "mlp.x=4x64:8x64:16x64"),
        "--json",
    )
    assert r.code == 0, r.err
    bundle, _, _ = read_bundle_manifest(tmp_path / "out")
    assert [p.shapes["x"].max for p in bundle.view("mlp").profiles] == [(4, 64), (16, 64)]
    assert bundle.view("conv").profiles[0].shapes["input"].max == (4, 3, 32, 32)
    # Input names with dots: unprefixed where one model has it, or after the model's name.
    for spelling in ("input.1", "dotted.input.1"):
        r = run(
            "build", dotted, fixed, "-o", tmp_path / spelling, "--no-weightful", "--shape", f"{spelling}=1x64:2x64:4x64"
        )
        assert r.code == 0, r.err
        assert read_bundle_manifest(tmp_path / spelling)[0].view("dotted").profiles[0].shapes["input.1"].max == (4, 64)
    # Text that reads as MODEL.INPUT and as another model's input is refused.
    other = renamed_input(mlp, tmp_path / "amb" / "b.onnx", "a.x")
    first = renamed_input(mlp, tmp_path / "amb" / "a.onnx", "x")
    r = run("build", first, other, "-o", tmp_path / "amb-out", "--no-weightful", "--shape", "a.x=1x64")
    assert r.code == 1 and "ambiguous" in r.err and "'b'" in r.err


def test_model_tables_in_bundle_toml(three: list[Path], tmp_path: Path) -> None:
    folder = three[0].parent
    toml = folder / "bundle.toml"
    toml.write_text(
        '[build]\nencoding = "zstd"\n'
        '[[model]]\nsource = "conv.onnx"\nname = "det"\nversion = "3"\n'
        '[model.dims]\nbatch = "1:2:4"\nheight = "8:16:32"\nwidth = "8:16:32"\n'
        '[[model.warmup]]\ninput = "2x3x16x16"\n'
        '[[model]]\nsource = "mlp.onnx"\n'
        '[[model.profiles]]\n[model.profiles.shapes]\nx = "1x64:2x64:4x64"\n'
        '[[model.profiles]]\n[model.profiles.shapes]\nx = "4x64:8x64:16x64"\n'
        '[[model]]\nsource = "fixed.onnx"\nname = "rec"\n'
    )
    config = load_config(toml)
    assert [m.model_name for m in config.models] == ["det", "mlp", "rec"]
    r = run("build", "-o", tmp_path / "out", "--config", toml, "--no-weightful", "--json")
    assert r.code == 0, r.err
    bundle, _, _ = read_bundle_manifest(tmp_path / "out")
    assert bundle.names == ("det", "mlp", "rec") and bundle.view("det").model.version == "3"
    assert bundle.view("det").warmup_shapes == ({"input": (2, 3, 16, 16)},)
    assert len(bundle.view("mlp").profiles) == 2 and bundle.view("rec").profiles == ()
    assert "zstd" in {b.encoding for b in bundle.weights.blobs} <= {"zstd", "none"}  # [build] applies to all
    # Files on the command line take the tables of their names; --shape for a model replaces its table's shapes.
    r = run(
        "build",
        three[1],
        three[0],
        "-o",
        tmp_path / "cli",
        "--config",
        toml,
        "--no-weightful",
        "--name",
        "mlp",
        "--name",
        "det",
        "--shape",
        "mlp.x=1x64:2x64:8x64",
    )
    assert r.code == 0, r.err
    assert "model[2] (model 'rec'): no file on the command line has that name; left out" in r.err
    bundle, _, _ = read_bundle_manifest(tmp_path / "cli")
    assert bundle.names == ("mlp", "det") and len(bundle.view("mlp").profiles) == 1
    assert bundle.view("det").warmup_shapes == ({"input": (2, 3, 16, 16)},)  # det kept its table's shapes


def test_top_level_shapes_placed_by_name_for_several_files(three: list[Path], tmp_path: Path) -> None:
    toml = tmp_path / "bundle.toml"
    toml.write_text(
        '[dims]\n"conv.batch" = "1:2:4"\nheight = "8:16:32"\nwidth = "8:16:32"\n"mlp.batch" = "1:4:8"\n'
        '[[warmup]]\ninput = "1x3x8x8"\n[[warmup]]\n"mlp.x" = "3x64"\n'
    )
    r = run("build", *three, "-o", tmp_path / "out", "--config", toml, "--no-weightful")
    assert r.code == 0, r.err
    bundle, _, _ = read_bundle_manifest(tmp_path / "out")
    assert bundle.view("mlp").profiles[0].shapes["x"].max == (8, 64)
    assert bundle.view("conv").warmup_shapes == ({"input": (1, 3, 8, 8)},)
    assert bundle.view("mlp").warmup_shapes == ({"x": (3, 64)},)
    toml.write_text('[dims]\nbatch = "1:2:4"\n')
    r = run("build", *three, "-o", tmp_path / "bad", "--config", toml, "--no-weightful")
    assert r.code == 1 and f"{toml}: dims.batch: 2 models have a dynamic dim named 'batch'" in r.err


def test_rebuilds_are_byte_identical(three: list[Path], tmp_path: Path) -> None:
    for name in ("one", "two"):
        assert run("build", *three, "-o", tmp_path / name, *SHAPES, "--no-weightful").code == 0

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert one == two and "manifest.json" in one and any(k.startswith("weights/") for k in one)


def test_a_failing_second_model_leaves_the_output_as_it_was(tmp_path: Path) -> None:
    good = models.make_fixed(tmp_path / "m")
    broken = tmp_path / "m" / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    out = tmp_path / "out"
    first = build_bundle(good, out, options=NO_ENGINES)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for second in (broken, models.make_conv(tmp_path / "m")):  # unreadable; dynamic without ranges
        with pytest.raises((ModelError, ConfigError)):
            build_bundle(
                None,
                out,
                options=BuildOptions(weightful=False, weightless=False, force=True),
                models=[ModelSpec(source=good, name="a"), ModelSpec(source=second)],
            )
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]  # no temp sibling left behind
    assert read_bundle_manifest(out)[0] == first.bundle


def test_weightful_engines_for_two_models(tmp_path: Path) -> None:
    """The one real TRT-RTX AOT build here: each model gets its own engine, built from its own graph."""
    conv, mlp = models.make_conv(tmp_path / "m"), models.make_mlp(tmp_path / "m")
    r = run(
        "build",
        conv,
        mlp,
        "-o",
        tmp_path / "out",
        "--sm",
        "86",
        "--json",
        "--dim",
        "conv.batch=1:2:4",
        "--dim",
        "height=8:8:16",
        "--dim",
        "width=8:8:16",
        "--dim",
        "mlp.batch=1:2:4",
    )
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert [(e["model"], e["kind"], e["compute_capabilities"]) for e in summary["engines"]] == [
        ("conv", "weightful", [86]),
        ("mlp", "weightful", [86]),
    ]
    bundle, _, _ = read_bundle_manifest(tmp_path / "out")
    engines = [m.engines[0].file for m in bundle.models]
    assert engines[0].sha256 != engines[1].sha256 and all((tmp_path / "out" / e.path).is_file() for e in engines)
    assert verify_bundle(tmp_path / "out") == []


def test_no_model_given(tmp_path: Path) -> None:
    r = run("build", "-o", tmp_path / "out")
    assert r.code == 1 and "no model given" in r.err and "[[model]]" in r.err
    assert not os.path.exists(tmp_path / "out")


def test_place_takes_the_longest_model_prefix_then_the_whole_name() -> None:
    from bundler.model_options import place

    owners = {"det": ["x", "v2.x"], "det.v2": ["x"], "rec": ["input.1"]}
    assert place("det.v2.x", {"det.v2": ["x"], "det": ["y"]}, kind="input", where="w") == ("det.v2", "x")
    assert place("input.1", owners, kind="input", where="w") == ("rec", "input.1")
    assert place("rec.input.1", owners, kind="input", where="w") == ("rec", "input.1")
    with pytest.raises(ConfigError, match="2 models have an input named 'x': det, det.v2"):
        place("x", owners, kind="input", where="w")
    assert place("det.v2.x", owners, kind="input", where="w") == ("det.v2", "x")  # the longest model name wins
    # "a.x": input "x" of model a, and the whole name of b's input: refused.
    with pytest.raises(ConfigError, match="ambiguous"):
        place("a.x", {"a": ["x"], "b": ["a.x"]}, kind="input", where="w")
    # One model: a name it lacks stays whole, for its own checks to report with its inputs.
    assert place("nope", {"m": ["x"]}, kind="input", where="w") == ("m", "nope")
