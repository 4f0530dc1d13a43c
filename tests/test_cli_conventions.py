"""CLI conventions (issue 12): results on stdout, diagnostics on stderr, -v/-q anywhere, exit codes in --help,
.trtx archives wherever a bundle is read, and TRT-RTX's verdict on a model it cannot parse (a real parse, op Det)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import runtime_shim
from bundler.cli import main
from runtime_shim.errors import EngineBuildError
from runtime_shim.manifest import Profile, ShapeRange, TensorSpec, read_manifest
from tests import models

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str | Path) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(bundle dir, its .trtx archive, the model) of the MLP test model, weightful engine off (fast)."""
    root = tmp_path_factory.mktemp("conv")
    model = models.make_mlp(root / "m")
    r = cli("build", model, "-o", root / "b", "--shape", "x=1x64:4x64:16x64", "--no-weightful", "--json")
    assert r.exit_code == 0, r.output
    r = cli("pack", root / "b", "-o", root / "b.trtx")
    assert r.exit_code == 0, r.output
    return root / "b", root / "b.trtx", model


# --------------------------------------------------------------------------- streams, -v/-q, --help
def test_inspect_redirected_to_a_file_has_the_result(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, _, _ = packed
    out = tmp_path / "info.txt"
    with open(out, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-c", "from bundler.cli import main; main()", "inspect", str(bundle)],
            stdout=f,
            stderr=subprocess.PIPE,
            cwd=REPO,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "model    mlp" in text and "coverage" in text and proc.stderr == b""


def test_results_on_stdout_diagnostics_on_stderr(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, _, model = packed
    r = cli("verify", bundle)
    assert r.exit_code == 0 and r.stdout.startswith("OK ")
    r = cli("build", model, "-o", tmp_path / "b2", "--shape", "x=1x64:4x64:16x64", "--no-weightful")
    assert r.exit_code == 0 and r.stdout.startswith("built ") and "built" not in r.stderr
    r = cli("doctor", bundle, "--cache-dir", tmp_path / "c")
    assert r.exit_code == 0 and "engines (* taken" in r.stdout
    j = cli("inspect", bundle, "--json")
    assert json.loads(j.stdout)["model"]["name"] == "mlp" and j.stderr == ""  # --json: JSON alone on stdout


def test_verbose_and_quiet_anywhere(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, _, model = packed
    shape = ("--shape", "x=1x64:4x64:16x64", "--sm", "86")
    before = cli("-v", "build", model, "-o", tmp_path / "a", *shape)
    after = cli("build", model, "-o", tmp_path / "b", *shape, "-v")
    assert before.exit_code == after.exit_code == 0, after.output
    for r in (before, after):  # INFO logging: the engine build's own line
        assert "weightful engine" in r.stderr and "bytes in" in r.stderr
    quiet = cli("build", model, "-o", tmp_path / "c", "--shape", "x=1x64:4x64:16x64", "--no-weightful", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout.startswith("built ")
    assert cli("inspect", bundle, "-v", "-q").exit_code == 0
    assert cli("-q", "inspect", bundle, "-vv").exit_code == 0


def test_every_command_documents_its_exit_codes() -> None:
    for name in main.commands:
        text = cli(name, "--help").stdout
        assert "Exit codes:" in text and "0  " in text and "2  usage error" in text, name
        assert "-v, --verbose" in text and "-q, --quiet" in text, name
    farm = cli("farm-job", "--help").stdout
    assert "3  this machine cannot serve" in farm and "PART_DIR" not in farm and "-o/--out" in farm


def test_a_model_without_weights_says_so(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "noweights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    r = cli("build", path, "-o", tmp_path / "b", "--no-weightful")
    assert r.exit_code == 0, r.output
    assert "weights: none (the model has no weights)" in r.stdout and "0.00x" not in r.stdout
    assert "weights  none" in cli("inspect", tmp_path / "b").stdout


# --------------------------------------------------------------------------- archives
def test_read_only_commands_take_the_archive(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, archive, _ = packed
    as_dir, as_tar = (json.loads(cli("inspect", p, "--json").stdout) for p in (bundle, archive))
    assert {**as_dir, "bundle": ""} == {**as_tar, "bundle": ""}
    ok = cli("verify", archive)
    assert ok.exit_code == 0 and "every entry of the archive matches" in ok.stdout
    d1, d2 = (
        json.loads(cli("doctor", p, "--json", "--cache-dir", tmp_path / "c").stdout)["bundle"]["engines"]
        for p in (bundle, archive)
    )
    assert d1 == d2
    assert sorted(os.listdir(archive.parent)) == ["b", "b.trtx", "m"], "read in place: nothing extracted"
    damaged = tmp_path / "damaged.trtx"
    import tarfile

    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    data = bytearray(archive.read_bytes())
    data[last.offset_data + last.size // 2] ^= 0xFF  # inside the last pinned file
    damaged.write_bytes(bytes(data))
    bad = cli("verify", damaged, "--json")
    problems = json.loads(bad.stdout)["problems"]
    assert bad.exit_code == 1 and problems[0]["kind"] == "archive" and "sha256" in problems[0]["message"]


def test_run_and_load_unpack_the_archive_once(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, archive, model = packed
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cache = tmp_path / "cache"
    args = ["run", archive, "-i", f"x={tmp_path / 'x.npy'}", "-o", tmp_path / "out", "--cache-dir", cache]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    (unpacked,) = (cache / "trtx-v1" / "bundles").iterdir()
    stamp = (unpacked / "manifest.json").stat().st_mtime_ns
    assert cli(*args).exit_code == 0
    assert (unpacked / "manifest.json").stat().st_mtime_ns == stamp, "the second run reuses the unpacked copy"
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (name,) = [p for p in (tmp_path / "out").iterdir()]
    # Exact on the fallback; TRT-RTX (a GPU here: the bundle then has this GPU's weightless engine) may round apart.
    np.testing.assert_allclose(np.load(name), want, rtol=1e-3, atol=1e-4)
    with runtime_shim.load(archive, cache_dir=cache) as s:
        got = next(iter(s.run({"x": x}).values()))
        if s.backend == "onnxruntime":
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert len(list((cache / "trtx-v1" / "bundles").iterdir())) == 1


# --------------------------------------------------------------------------- a model TRT-RTX cannot parse
def test_unparsable_model_explained_and_recorded(tmp_path: Path) -> None:
    model = models.make_unsupported(tmp_path / "m")
    r = cli("build", model, "-o", tmp_path / "b", "--shape", "x=1x3x3:4x3x3:16x3x3", "--sm", "89")
    assert r.exit_code == 1 and not (tmp_path / "b").exists()
    assert f"ERROR {model}: TensorRT for RTX" in r.stderr and "normalized" not in r.stderr  # the user's file
    assert f"{models.UNSUPPORTED_OP} x1 (node determinant)" in r.stderr and "--no-weightful" in r.stderr
    r = cli("build", model, "-o", tmp_path / "b", "--shape", "x=1x3x3:4x3x3:16x3x3", "--no-weightful")
    assert r.exit_code == 0, r.output
    assert "cannot parse" in r.stderr and "engines: none (TensorRT for RTX cannot parse" in r.stdout
    manifest, _ = read_manifest(tmp_path / "b")
    verdict = manifest.trt_rtx.cannot_parse
    assert verdict is not None and [(u.op, u.count, u.nodes) for u in verdict.unsupported_ops] == [
        (models.UNSUPPORTED_OP, 1, ("determinant",))
    ]
    assert b'"parse": {' in (tmp_path / "b" / "manifest.json").read_bytes()
    d = json.loads(cli("inspect", tmp_path / "b", "--json").stdout)
    assert {row["engine"] for row in d["coverage"]["rows"]} == {"fallback"}
    text = cli("inspect", tmp_path / "b").stdout
    assert "build here" not in text and "could not parse this model" in text
    doctor = json.loads(cli("doctor", tmp_path / "b", "--json", "--cache-dir", tmp_path / "c").stdout)
    (build,) = [c for c in doctor["bundle"]["engines"] if c["kind"] == "build"]
    assert not build["viable"] and "could not parse" in build["reason"]


def test_parsable_models_record_no_verdict(packed: tuple[Path, Path, Path]) -> None:
    bundle, _, _ = packed
    assert b'"parse"' not in (bundle / "manifest.json").read_bytes()  # bundles of models that parse keep their bytes
    assert read_manifest(bundle)[0].trt_rtx.verdict is None


def _inputs() -> list[TensorSpec]:
    return [
        TensorSpec(name="ids", dtype="float32", shape=("batch", "seq_len")),
        TensorSpec(name="mask", dtype="float32", shape=("batch", "seq_len")),
    ]


def _profile(opt_ids: int, opt_mask: int) -> Profile:
    def rng(opt: int) -> ShapeRange:
        return ShapeRange(min=(1, 1), opt=(1, opt), max=(1, 512))

    return Profile(shapes={"ids": rng(opt_ids), "mask": rng(opt_mask)})


def test_optimizer_errors_matched_only_where_the_message_says(tmp_path: Path) -> None:
    from bundler.engines import explain_build_failure

    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), str(plain))
    head = "model.onnx: TensorRT for RTX could not build the engine:\n  "
    kopt = EngineBuildError(
        head + "Profile kOPT values are not self-consistent. Dimensions with name seq_len must be equal"
    )
    e = explain_build_failure(kopt, [_profile(128, 64)], _inputs(), plain)
    assert "'seq_len' is shared by ids, mask" in str(e) and "ids[1]=128, mask[1]=64" in str(e)
    assert "--dim seq_len=" in (e.hint or "") and "If" not in (e.hint or "")
    contradictory = EngineBuildError(
        head + "Input dimensions with this name have different constant values or have contradictory "
        "IOptimizationProfile kMIN/kMAX constraints"
    )
    e = explain_build_failure(contradictory, [_profile(128, 64)], _inputs(), plain)
    assert "'seq_len' is used by ids[1], mask[1]" in str(e) and "placeholder" in (e.hint or "")
    scope = EngineBuildError(head + "[graphScope.cpp::analyze::471] Assertion ScopeType::kUNDEFINED failed")
    e = explain_build_failure(scope, [], [], plain)  # the message alone: no nested If in this model
    assert str(e) == str(scope) and "If" not in (e.hint or "") and "--no-weightful" in (e.hint or "")
    other = EngineBuildError(head + "something new")
    e = explain_build_failure(other, [], [], plain)
    assert str(e) == str(other) and "cause" not in str(e)


def _shared_dim_model(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Add", ["ids", "mask"], ["y"], name="add")],
        "shared",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq_len"]) for n in ("ids", "mask")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq_len"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    "ranges, words",
    [
        # TRT-RTX 1.7: "Profile kOPT values are not self-consistent. Dimensions with name seq_len must be equal"
        (((1, 128, 512), (1, 64, 512)), ["'seq_len' is shared by ids, mask", "kOPT values ids[1]=128, mask[1]=64"]),
        # TRT-RTX 1.7: "seq_len: Input dimensions with this name have different constant values or ..."
        (((64, 64, 64), (32, 32, 32)), ["the dim name 'seq_len' is used by ids[1], mask[1] with different sizes"]),
    ],
)
def test_real_optimizer_errors_get_their_cause(tmp_path: Path, ranges: tuple, words: list[str]) -> None:
    """A real AOT build (no GPU needed) with a profile the bundler's own checks would refuse, to see TRT-RTX's words."""
    from bundler.engines import EnginePlan, build_engines

    model = _shared_dim_model(tmp_path / "shared.onnx")
    shapes = {n: ShapeRange(min=(1, r[0]), opt=(1, r[1]), max=(1, r[2])) for n, r in zip(("ids", "mask"), ranges)}
    plan = EnginePlan(kind="weightful", platform="linux_x86_64", compute_capabilities=(89,))
    with pytest.raises(EngineBuildError) as e:
        build_engines(
            model, [Profile(shapes=shapes)], [plan], tmp_path / "b", source="/home/me/model.onnx", inputs=_inputs()
        )
    text = str(e.value)
    assert text.startswith("/home/me/model.onnx: TensorRT for RTX could not build the engine")
    for w in words:
        assert w in text, text
    hint = e.value.hint or ""
    assert "If" not in hint and ("--dim seq_len" in hint or "placeholder" in hint), hint


def test_archive_unpacked_once_even_by_concurrent_loads(packed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from runtime_shim.archive import unpack_cached

    _, archive, _ = packed
    with ThreadPoolExecutor(4) as pool:
        dirs = set(pool.map(lambda _: unpack_cached(archive, tmp_path / "bundles"), range(4)))
    assert len(dirs) == 1 and [p.name for p in (tmp_path / "bundles").iterdir()] == [next(iter(dirs)).name]


def test_a_damaged_archive_is_refused_by_load_and_leaves_nothing(
    packed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    import tarfile

    from runtime_shim.errors import BundleError

    _, archive, _ = packed
    with tarfile.open(archive) as tar:
        last = tar.getmembers()[-1]
    data = bytearray(archive.read_bytes())
    data[last.offset_data] ^= 0xFF
    damaged = tmp_path / "damaged.trtx"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        runtime_shim.load(damaged, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c" / "trtx-v1" / "bundles").iterdir())


def test_unparsable_model_on_a_gpu_machine_bundles_with_no_weightful(tmp_path: Path) -> None:
    """With a supported GPU, --no-weightful still plans this GPU's weightless engine; its parse failure is the verdict."""
    from types import SimpleNamespace

    from bundler.build import build_bundle
    from bundler.config import make_options

    gpu = SimpleNamespace(index=0, sm=89, name="NVIDIA GeForce RTX 4090")
    machine = SimpleNamespace(gpus=(gpu,), driver_problem=lambda: None)
    model = models.make_unsupported(tmp_path / "m")
    notes: list[str] = []

    class Progress:
        def step(self, label: str) -> object:
            import contextlib

            return contextlib.nullcontext()

        def note(self, message: str) -> None:
            notes.append(message)

        def advance(self, label: str, done: int, total: int) -> None:
            pass

    options = make_options(shapes=("x=1x3x3:4x3x3:16x3x3",), weightful=False)
    result = build_bundle(model, tmp_path / "b", options=options, probe=lambda: machine, progress=Progress())
    assert result.manifest.engines == () and result.manifest.trt_rtx.cannot_parse is not None
    assert any("cannot parse this model (Det x1)" in n for n in notes)
    with pytest.raises(EngineBuildError, match="could not parse"):  # a weightful engine was asked for: an error
        build_bundle(
            model,
            tmp_path / "b2",
            options=make_options(shapes=("x=1x3x3:4x3x3:16x3x3",), sms=(89,)),
            probe=lambda: machine,
        )
