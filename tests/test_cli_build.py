"""The build-side commands through click: exit codes, stdout JSON vs stderr messages, errors as `ERROR ...` + hint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from bundler.cli import main
from tests import models


def run(*args: str | Path) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cli")
    model = models.make_conv(root / "models")
    result = run(
        "build",
        model,
        "-o",
        root / "bundle",
        "--shape",
        "input=1x3x16x16:2x3x32x32:4x3x64x64",
        "--shape",
        "input=4x3x64x64:8x3x64x64:8x3x128x128",
        "--sm",
        "86,89",
        "--name",
        "tiny-conv",
        "--json",
    )
    assert result.exit_code == 0, result.output
    return root / "bundle", json.loads(result.stdout)


def test_build_json_on_stdout_notes_on_stderr(cli_bundle: tuple[Path, dict]) -> None:
    bundle, summary = cli_bundle
    assert summary["bundle"] == str(bundle) and summary["model"] == "tiny-conv"
    assert summary["raw_weight_bytes"] > 0 and summary["stored_weight_bytes"] > 0
    assert [e["compute_capabilities"] for e in summary["engines"]] == [[86, 89]]


def test_build_human_output(tmp_path: Path) -> None:
    result = run("build", models.make_fixed(tmp_path), "-o", tmp_path / "b", "--sm", "86")
    assert result.exit_code == 0 and "built" not in result.stderr  # the summary is the result: stdout
    assert "built" in result.stdout and "weights:" in result.stdout and "engine: weightful" in result.stdout


def test_inspect(cli_bundle: tuple[Path, dict]) -> None:
    bundle, _ = cli_bundle
    human = run("inspect", bundle)
    assert human.exit_code == 0 and human.stderr == ""
    for text in (
        "tiny-conv",
        "[batch, 3, height, width]",
        "[0] input",
        "[1] input",
        "4x3x64x64 : 8x3x64x64 : 8x3x128x128",
        "bytes raw ->",
        "weightful",
        "SM 8.6, 8.9",
        "runtime caches  (none)",
    ):
        assert text in human.stdout, text
    d = json.loads(run("inspect", bundle, "--json").stdout)
    assert len(d["profiles"]) == 2 and d["weights"]["tensors"] == 6 and d["engines"][0]["kind"] == "weightful"


def test_verify_ok_and_damaged(cli_bundle: tuple[Path, dict], tmp_path: Path) -> None:
    bundle, _ = cli_bundle
    ok = run("verify", bundle)
    assert ok.exit_code == 0 and "OK" in ok.stdout
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (engine,) = (copy / "engines").iterdir()
    engine.write_bytes(engine.read_bytes()[:1000])
    (copy / "extra.txt").write_text("?")
    bad = run("verify", copy)
    assert bad.exit_code == 1
    assert "ERROR" in bad.stderr and "2 problem(s)" in bad.stderr and "2 problem(s)" in bad.stdout
    assert f"engines/{engine.name}: truncated" in bad.stdout and "extra.txt: not listed in the manifest" in bad.stdout
    j = run("verify", copy, "--json")
    assert j.exit_code == 1 and sorted(p["kind"] for p in json.loads(j.stdout)["problems"]) == ["extra", "truncated"]


def test_pack_unpack(cli_bundle: tuple[Path, dict], tmp_path: Path) -> None:
    bundle, _ = cli_bundle
    packed = run("pack", bundle, "-o", tmp_path / "b.trtx")
    assert packed.exit_code == 0 and "packed" in packed.stdout
    unpacked = run("unpack", tmp_path / "b.trtx", "-o", tmp_path / "out")
    assert unpacked.exit_code == 0 and "verified" in unpacked.stdout
    assert run("verify", tmp_path / "out").exit_code == 0
    again = run("unpack", tmp_path / "b.trtx", "-o", tmp_path / "out")
    assert again.exit_code == 1 and "ERROR" in again.stderr and "not an empty directory" in again.stderr


def test_errors_are_rendered_with_a_hint(tmp_path: Path) -> None:
    model = models.make_conv(tmp_path)
    r = run("build", model, "-o", tmp_path / "b")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "ERROR" in r.stderr and "'input' has dynamic dims [batch, 3, height, width]" in r.stderr
    assert "hint: pass --dim batch=1:8:64 --dim height=1:8:64 --dim width=1:8:64 " in r.stderr
    assert "--shape input=1x3x1x1:8x3x8x8:64x3x64x64" in r.stderr
    r = run("build", model, "-o", tmp_path / "b", "--shape", "input=4x3x8x8:1x3x8x8:8x3x8x8")
    assert r.exit_code == 1 and "min <= opt <= max" in r.stderr
    r = run("build", model, "-o", tmp_path / "b", "--shape", "input=1x3x8x8", "--sm", "90")
    assert r.exit_code == 1 and "--sm: [90] are not TensorRT for RTX targets" in r.stderr
    r = run("build", tmp_path / "missing.onnx", "-o", tmp_path / "b")
    assert r.exit_code == 1 and "missing.onnx" in r.stderr
    assert not (tmp_path / "b").exists()


def test_force_flag(tmp_path: Path) -> None:
    model = models.make_fixed(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("k")
    r = run("build", model, "-o", out, "--sm", "86")
    assert r.exit_code == 1 and "--force" in r.stderr
    r = run("build", model, "-o", out, "--sm", "86", "--force")
    assert r.exit_code == 0, r.output
    assert (out / "keep.txt").read_text() == "k" and "keep.txt" in r.stderr  # a note: stderr


def test_config_file(tmp_path: Path) -> None:
    model = models.make_mlp(tmp_path)
    config = tmp_path / "bundle.toml"
    config.write_text(
        '[model]\nname = "from-toml"\nversion = "2.1"\n[build]\nsm = [89]\nencoding = "zstd"\n'
        '[[profiles]]\n[profiles.shapes]\nx = "1x64:2x64:8x64"\n[[warmup]]\nx = "2x64"\n'
    )
    r = run("build", model, "-o", tmp_path / "b", "--config", config, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(run("inspect", tmp_path / "b", "--json").stdout)
    assert d["model"]["name"] == "from-toml" and d["model"]["version"] == "2.1"
    assert d["engines"][0]["compute_capabilities"] == [89] and d["warmup_shapes"] == [{"x": [2, 64]}]
    assert d["weights"]["encodings"].keys() <= {"zstd", "none"}


def test_progress_shows_only_slow_steps(capsys: pytest.CaptureFixture[str]) -> None:
    import time

    from bundler.cli.app import StderrProgress

    progress = StderrProgress()
    progress.DELAY = 0.05
    with progress.step("quick step"):
        pass
    with progress.step("slow step"):
        time.sleep(0.2)
        progress.advance("slow step", 50, 100)
    err = capsys.readouterr().err
    assert "quick step" not in err
    assert "slow step ..." in err and "slow step: 50%" in err and "slow step: done in" in err


def _pixels_model(dir: Path) -> Path:
    """The conv test model with its input named `pixels` [batch, 3, height, width] (not the template's `input`)."""
    model = onnx.load(str(models.make_conv(dir)))
    model.graph.input[0].name = "pixels"
    for node in model.graph.node:
        node.input[:] = ["pixels" if n == "input" else n for n in node.input]
    path = dir / "pixels.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "ranges",
    [
        ["--shape", "pixels=1x3x16x16:2x3x32x32:4x3x64x64", "--sm", "89"],
        ["--dim", "batch=1:2:4", "--dim", "height=16:32:64", "--dim", "width=16:48:64", "--no-weightful"],
    ],
)
def test_template_config_fits_any_model(tmp_path: Path, ranges: list[str]) -> None:
    """templates/bundle.toml names no input: --shape or --dim give the ranges, and warm-ups follow the profiles."""
    model = _pixels_model(tmp_path / "m")
    template = Path(__file__).resolve().parent.parent / "templates" / "bundle.toml"
    r = run("build", model, "-o", tmp_path / "b", "--config", template, *ranges, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(run("inspect", tmp_path / "b", "--json").stdout)
    assert list(d["profiles"][0]["shapes"]) == ["pixels"] and d["warmup_shapes"] == []
    assert d["model"]["name"] == "pixels" and d["model"]["version"] == "1.0.0"
    assert [e["kind"] for e in d["engines"]] == (["weightful"] if "--sm" in ranges else [])


def test_dim_flag_errors(tmp_path: Path) -> None:
    model = models.make_conv(tmp_path)
    r = run("build", model, "-o", tmp_path / "b", "--dim", "batch=1:2:4")
    assert r.exit_code == 1 and "no range for the dynamic dims height, width" in r.stderr
    assert "hint: pass --dim height=1:8:64 --dim width=1:8:64 " in r.stderr
    r = run("build", model, "-o", tmp_path / "b", "--dim", "batch=4:2:8")
    assert r.exit_code == 1 and "--dim batch=4:2:8: expected 1 <= min <= opt <= max" in r.stderr
    assert not (tmp_path / "b").exists()
