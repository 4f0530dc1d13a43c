"""bundle.toml and --shape parsing, and the profile checks against a model's inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundler.config import (
    BundleConfig,
    ConfigError,
    DimRange,
    make_options,
    parse_dim_args,
    parse_range,
    parse_shape_args,
)
from bundler.config_file import load_config
from bundler.dims import resolve_profiles
from runtime_shim.manifest import Profile, ShapeRange, TensorSpec

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "bundle.toml"

IMAGE = TensorSpec(name="input", dtype="float32", shape=("batch", 3, "height", "width"))
MASK = TensorSpec(name="mask", dtype="float32", shape=(1, 4))


def test_range_and_fixed_shape() -> None:
    assert parse_range("1x3:4x3:8x3", where="t") == ShapeRange(min=(1, 3), opt=(4, 3), max=(8, 3))
    assert parse_range("2x64", where="t") == ShapeRange(min=(2, 64), opt=(2, 64), max=(2, 64))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4x3:1x3:8x3", "axis 0: expected min <= opt <= max, got 4 / 1 / 8"),  # min > opt
        ("1x3:9x3:8x3", "axis 0: expected min <= opt <= max, got 1 / 9 / 8"),  # opt > max
        ("1x3:4x3x1:8x3", "different ranks"),
        ("1x3:4x3", "expected MIN:OPT:MAX"),
        ("1,3:4,3:8,3", "dims joined by 'x'"),
    ],
)
def test_bad_ranges(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("/", "/")) as e:
        parse_range(text, where="--shape x")
    assert "--shape x" in str(e.value)


def test_several_profiles_rule() -> None:
    profiles = parse_shape_args(["x=1x3:4x3:8x3", "x=8x3:16x3:64x3", "mask=1x4"])
    assert len(profiles) == 2
    assert profiles[0].shapes["x"].max == (8, 3) and profiles[1].shapes["x"].max == (64, 3)
    assert profiles[0].shapes["mask"] == profiles[1].shapes["mask"]  # given once: applies to every profile
    with pytest.raises(ConfigError, match="'y' given 2 times"):
        parse_shape_args(["x=1:2:3", "x=1:2:3", "x=1:2:3", "y=1", "y=2"])
    with pytest.raises(ConfigError, match="expected NAME=MIN:OPT:MAX"):
        parse_shape_args(["1x3:4x3:8x3"])


def test_dynamic_input_without_profile_names_input_dims_and_flag() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_profiles([IMAGE, MASK], [], source="model.onnx")
    msg = str(e.value)
    assert "'input'" in msg and "[batch, 3, height, width]" in msg
    assert "--shape input=1x3x1x1:8x3x8x8:64x3x64x64" in (e.value.hint or "")


def test_fixed_model_needs_no_profile() -> None:
    assert resolve_profiles([MASK], [], source="m") == ()


def test_rank_mismatch_fixed_dim_mismatch_and_unknown_input() -> None:
    with pytest.raises(ConfigError, match=r"'input' has rank 4 .* rank 2"):
        resolve_profiles([IMAGE], parse_shape_args(["input=1x3:2x3:4x3"]), source="m")
    with pytest.raises(ConfigError, match="axis 1 is fixed at 3 in the model, but the range gives 4/4/4"):
        resolve_profiles([IMAGE], parse_shape_args(["input=1x4x8x8:1x4x8x8:1x4x8x8"]), source="m")
    with pytest.raises(ConfigError, match="no model input named 'inputs'") as e:
        resolve_profiles([IMAGE], parse_shape_args(["inputs=1x3x8x8"]), source="m")
    assert "input" in (e.value.hint or "")


def test_every_profile_covers_every_dynamic_input() -> None:
    two = TensorSpec(name="b", dtype="float32", shape=("n",))
    profiles = (Profile(shapes={"input": parse_range("1x3x8x8", where="t")}),)
    with pytest.raises(ConfigError, match="input 'b' has dynamic dims"):
        resolve_profiles([IMAGE, two], profiles, source="m")


def test_template_parses_and_merges() -> None:
    config = load_config(TEMPLATE)
    # It fits any model: no input names in it, so warm-ups follow the profiles the command line gives.
    assert not config.profiles and not config.dims and not config.warmup_shapes and config.name is None
    options = make_options(config)
    assert options.encoding == "zstd-byteplane" and options.sms == (86, 89, 120)
    # Command line wins: --shape replaces the file's profiles, --sm its targets.
    options = make_options(config, shapes=["input=1x3x8x8"], sms=[89, 86], name="other", weightful=False)
    assert options.profiles == (Profile(shapes={"input": parse_range("1x3x8x8", where="t")}),)
    assert options.sms == (86, 89) and options.name == "other" and options.weightful is False


def test_dims_table_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "bundle.toml"
    path.write_text(
        '[dims]\nbatch = "1:4:16"\nseq_len = ["1:128:512", "512:1024:4096"]\nfixed = 3\n'
        '[[profiles]]\n[profiles.shapes]\nx = "1x8:2x8:4x8"\n[[warmup]]\nx = "2x8"\n'
    )
    config = load_config(path)
    assert config.dims == {
        "batch": (DimRange(1, 4, 16),),
        "fixed": (DimRange(3, 3, 3),),
        "seq_len": (DimRange(1, 128, 512), DimRange(512, 1024, 4096)),
    }
    kept = make_options(config)
    assert kept.dims == config.dims and kept.profiles == config.profiles and kept.warmup_shapes == config.warmup_shapes
    # Any --shape or --dim replaces the file's profiles, dims and warm-ups (the warm-ups fit the file's profiles).
    replaced = make_options(config, dims=["seq_len=1:64:256", "seq_len=256:512:1024", "batch=2"])
    assert replaced.dims == {"batch": (DimRange(2, 2, 2),), "seq_len": (DimRange(1, 64, 256), DimRange(256, 512, 1024))}
    assert replaced.profiles == () and replaced.warmup_shapes == ()
    assert parse_dim_args(["n=8"]) == {"n": (DimRange(8, 8, 8),)}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("n=4:2:8", "expected 1 <= min <= opt <= max, got 4 / 2 / 8"),
        ("n=0:2:8", "expected 1 <= min <= opt <= max, got 0 / 2 / 8"),
        ("n=1:2", "expected MIN:OPT:MAX"),
        ("n=1x2:2:3", "expected MIN:OPT:MAX"),
        ("1:2:3", "expected NAME=MIN:OPT:MAX"),
    ],
)
def test_bad_dim_flags(value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_dim_args([value])


def test_bad_dims_table(tmp_path: Path) -> None:
    path = tmp_path / "bundle.toml"
    path.write_text("[dims]\nseq_len = 1.5\n")
    with pytest.raises(ConfigError, match=r"dims.seq_len: expected \"MIN:OPT:MAX\"") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_config_errors_name_file_and_key(tmp_path: Path) -> None:
    cases = {
        "[build]\nsm = [90]\n": "build.sm: [90] are not TensorRT for RTX targets",
        "[build]\nweightfull = true\n": "build.weightfull: unknown key",
        '[[profiles]]\n[profiles.shapes]\nx = "4:2:8"\n': "profiles[0].shapes.x: axis 0",
        "[[profiles]]\nshapes = 3\n": "profiles[0].shapes: expected a table",
        '[[warmup]]\nx = "1x3y"\n': "warmup[0].x: expected dims joined by 'x'",
        "[model\n": "not valid TOML",
        '[build]\nencoding = "lz4"\n': "build.encoding: expected one of",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"b{i}.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(path) in str(e.value) and expected in str(e.value), (text, str(e.value))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_farm_table_is_kept_for_the_farm(tmp_path: Path) -> None:
    path = tmp_path / "bundle.toml"
    path.write_text('[model]\nname = "m"\n[farm]\nanything = 1\n')
    assert load_config(path).farm == {"anything": 1}


def test_bad_sm_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"--sm: \[90\]"):
        make_options(BundleConfig(source="x"), sms=[86, 90])


def test_model_tables(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "bundle.toml"
    path.write_text(
        '[[model]]\nsource = "../det.onnx"\nversion = "2"\n[model.dims]\nbatch = ["1:2:4", "4:8:16"]\n'
        '[[model]]\nname = "rec"\n[[model.profiles]]\n[model.profiles.shapes]\nx = "1x8:2x8:4x8"\n'
        '[[model.warmup]]\nx = "2x8"\n[build]\nsm = [86]\n'
    )
    config = load_config(path)
    det, rec = config.models
    assert det.source == tmp_path / "sub" / ".." / "det.onnx" and det.model_name == "det" and det.version == "2"
    assert det.dims == {"batch": (DimRange(1, 2, 4), DimRange(4, 8, 16))} and det.profiles == ()
    assert rec.source is None and rec.model_name == "rec" and rec.warmup_shapes == ({"x": (2, 8)},)
    assert rec.profiles == (Profile(shapes={"x": parse_range("1x8:2x8:4x8", where="t")}),)
    assert config.sms == (86,) and config.name is None and not config.profiles


def test_model_table_errors_name_the_table(tmp_path: Path) -> None:
    cases = {
        '[[model]]\nversion = "1"\n': "model[0]: expected source = ",
        '[[model]]\nsource = "a.onnx"\nsize = 3\n': "model[0].size: unknown key",
        '[[model]]\nsource = "a.onnx"\n[model.dims]\nn = "4:2:8"\n': "model[0].dims.n: expected 1 <= min",
        '[[model]]\nsource = "a.onnx"\n[[model]]\nsource = "b.onnx"\n[[model.profiles]]\nshapes = 3\n': (
            "model[1].profiles[0].shapes: expected a table"
        ),
        '[[model]]\nsource = "x/a.onnx"\n[[model]]\nname = "a"\n': "two [[model]] tables name the model 'a'",
        '[dims]\nn = "1:2:3"\n[[model]]\nsource = "a.onnx"\n': "dims: with [[model]] tables, each model's",
        "[[model]]\nsource = 3\n": "model[0].source: expected str",
    }
    for i, (text, expected) in enumerate(cases.items()):
        path = tmp_path / f"b{i}.toml"
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(path) in str(e.value) and expected in str(e.value), (text, str(e.value))


def test_model_name_in_a_single_model_table_names_one_model(tmp_path: Path) -> None:
    from bundler.model_options import plan_models

    path = tmp_path / "bundle.toml"
    path.write_text('[model]\nname = "m"\nversion = "5"\n')
    config = load_config(path)
    (spec,) = plan_models(config, [tmp_path / "a.onnx"]).specs
    assert (spec.name, spec.version) == ("m", "5")
    with pytest.raises(ConfigError, match="model.name names one model, but 2 are built"):
        plan_models(config, [tmp_path / "a.onnx", tmp_path / "b.onnx"])
    specs = plan_models(config, [tmp_path / "a.onnx", tmp_path / "b.onnx"], names=["x", "y"]).specs
    assert [(s.name, s.version) for s in specs] == [("x", "5"), ("y", "5")]


def test_template_model_tables_example_parses(tmp_path: Path) -> None:
    text = TEMPLATE.read_text(encoding="utf-8")
    example = text[text.index("# [[model]]") : text.index("# [farm]")]
    path = tmp_path / "bundle.toml"
    path.write_text("\n".join(line.removeprefix("#").removeprefix(" ") for line in example.splitlines()))
    det, rec = load_config(path).models
    assert (det.model_name, rec.model_name, rec.version) == ("det", "recognizer", "2.0.1")
    assert det.source == tmp_path / "det.onnx" and len(rec.profiles) == 1 and det.warmup_shapes
