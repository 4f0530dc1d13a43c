"""build_bundle end to end: every test model bundles, the result verifies and runs like the original, rebuilds are
byte-identical, and bad input fails clearly and leaves nothing behind."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from bundler.build import BuildResult, OutputDirError, build_bundle
from bundler.bundle_io import verify_bundle
from bundler.config import ConfigError, make_options
from bundler.engines import NO_GPU_NOTE, plan_engines
from runtime_shim.errors import EngineBuildError, ModelError
from runtime_shim.manifest import read_manifest
from runtime_shim.store.reader import WeightReader
from tests import models

SMS = [86, 89]  # two targets keep builds fast; the default targets are checked once below


def options_for(profile: models.ProfileDict | None, **kw) -> object:
    return make_options(shapes=models.shape_args(profile), sms=kw.pop("sms", SMS), **kw)


def no_gpu() -> SimpleNamespace:
    return SimpleNamespace(gpus=(), driver_problem=lambda: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, BuildResult]]:
    """Every bundlable test model, built once for this module."""
    root = tmp_path_factory.mktemp("built")
    out = {}
    for name, factory, profile in models.ALL_BUNDLABLE:
        model = factory(root / "models")
        out[name] = (model, build_bundle(model, root / name, options=options_for(profile), probe=no_gpu))
    return out


@pytest.mark.parametrize("name", [n for n, _, _ in models.ALL_BUNDLABLE])
def test_every_model_bundles_verifies_and_runs_like_the_original(built, name: str, tmp_path: Path) -> None:
    model, result = built[name]
    assert verify_bundle(result.bundle_dir) == []
    manifest, warnings = read_manifest(result.bundle_dir)
    assert warnings == [] and manifest == result.manifest
    assert [e.kind for e in manifest.engines] == ["weightful"] and manifest.engines[0].compute_capabilities == (86, 89)
    assert result.notes == (NO_GPU_NOTE,)
    assert result.raw_weight_bytes > 0 and result.stored_weight_bytes > 0 and result.engine_bytes > 0
    # The skeleton plus the unpacked weight store is the same model: same outputs under onnxruntime.
    (tmp_path / "skeleton.onnx").write_bytes((result.bundle_dir / manifest.skeleton.file.path).read_bytes())
    WeightReader(result.bundle_dir, manifest.weights).unpack_raw(tmp_path / manifest.skeleton.external_data)
    profile = dict((n, p) for n, _, p in models.ALL_BUNDLABLE)[name]
    feeds = models.sample_inputs(name, profile, model)
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
    actual = ort.InferenceSession(str(tmp_path / "skeleton.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(e, a)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# TRT-RTX 1.7.1 engine bytes are not reproducible in general (observed: silero-vad engines differ in hundreds to
# thousands of bytes between builds in one process, fixed shapes included; `conv` in ~1 build of 10). The small
# models below came out identical in 25 of 25 builds each, so for them the whole bundle is checked byte for byte.
DETERMINISTIC = [n for n, _, _ in models.ALL_BUNDLABLE if n != "conv"]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_rebuild_is_byte_identical(built, name: str, tmp_path: Path) -> None:
    model, first = built[name]
    profile = dict((n, p) for n, _, p in models.ALL_BUNDLABLE)[name]
    again = build_bundle(model, tmp_path / "again", options=options_for(profile), probe=no_gpu)
    assert _files(again.bundle_dir) == _files(first.bundle_dir)


def test_everything_but_trt_rtx_engines_is_byte_identical(silero_models: dict[str, Path], tmp_path: Path) -> None:
    """Our own output (weight store, skeleton, manifest) is reproducible for every model, silero-vad included."""
    paths = {n: f(tmp_path / "models") for n, f, _ in models.ALL_BUNDLABLE} | silero_models
    shapes = {n: p for n, _, p in models.ALL_BUNDLABLE} | SILERO_SHAPES
    for name, path in sorted(paths.items()):
        opts = dataclasses.replace(options_for(shapes[name]), weightful=False)
        a = build_bundle(path, tmp_path / f"{name}-a", options=opts, probe=no_gpu)
        b = build_bundle(path, tmp_path / f"{name}-b", options=opts, probe=no_gpu)
        assert _files(a.bundle_dir) == _files(b.bundle_dir), name


def test_conv_rebuild_engine_nondeterminism_is_reported_not_hidden(built, tmp_path: Path) -> None:
    """Two builds of `conv` (batch, height and width dynamic): everything but the engine must be identical; when
    TRT-RTX's engine bytes differ (about 1 build in 10) this is an xfail that counts the bytes, never a pass."""
    model, first = built["conv"]
    again = build_bundle(
        model,
        tmp_path / "again",
        options=options_for(dict((n, p) for n, _, p in models.ALL_BUNDLABLE)["conv"]),
        probe=no_gpu,
    )
    a, b = _files(first.bundle_dir), _files(again.bundle_dir)

    def same(files: dict) -> dict:
        return {k: v for k, v in files.items() if not k.startswith("engines/") and k != "manifest.json"}

    assert same(a) == same(b)
    if a != b:
        ea, eb = (
            [v for k, v in sorted(a.items()) if k.startswith("engines/")],
            [v for k, v in sorted(b.items()) if k.startswith("engines/")],
        )
        assert len(ea) == len(eb) == 1 and len(ea[0]) == len(eb[0])
        diff = int(np.count_nonzero(np.frombuffer(ea[0], np.uint8) != np.frombuffer(eb[0], np.uint8)))
        pytest.xfail(f"TRT-RTX engine bytes differ between two builds of the same model: {diff} bytes of {len(ea[0])}")


def test_source_date_epoch_sets_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = models.make_fixed(tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    result = build_bundle(model, tmp_path / "b1", options=make_options(sms=SMS, weightful=False), probe=no_gpu)
    assert result.manifest.creator.created == 1700000000
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert (
        build_bundle(
            model, tmp_path / "b2", options=make_options(sms=SMS, weightful=False), probe=no_gpu
        ).manifest.creator.created
        is None
    )


def test_default_targets_build(built, tmp_path: Path) -> None:
    model, _ = built["mlp"]
    result = build_bundle(
        model, tmp_path / "b", options=options_for({"x": ((1, 64), (4, 64), (16, 64))}, sms=None), probe=no_gpu
    )
    (engine,) = result.manifest.engines
    assert engine.compute_capabilities == () and "default" in engine.built_by["targets"]


# --------------------------------------------------------------------------- silero-vad
SILERO_PROFILE = {"input": ((1, 576), (1, 576), (4, 576)), "state": ((2, 1, 128), (2, 1, 128), (2, 4, 128))}
SILERO_SHAPES = {
    "silero_vad": SILERO_PROFILE,
    "silero_vad_16k_op15": SILERO_PROFILE,
    "silero_vad_half": SILERO_PROFILE,
    "silero_vad_op18_ifless": SILERO_PROFILE,
    "silero_vad_16k_sequence": {"input": ((1, 576), (4, 576), (16, 576))},
    "silero_vad_openvino_16k": None,
}
# TRT-RTX 1.7.1 fails an internal assertion on these (If nodes nested in If branches), with the original files too.
SILERO_TRT_RTX_FAILS = {"silero_vad", "silero_vad_16k_op15", "silero_vad_half"}


def test_silero_models_bundle(silero_models: dict[str, Path], tmp_path: Path) -> None:
    assert set(silero_models) == set(SILERO_SHAPES), "a new silero-vad model: add its profile here"
    for name, path in sorted(silero_models.items()):
        opts = options_for(SILERO_SHAPES[name])
        if name in SILERO_TRT_RTX_FAILS:
            with pytest.raises(EngineBuildError, match="graphScope.cpp") as e:
                build_bundle(path, tmp_path / name, options=opts, probe=no_gpu)
            assert "--no-weightful" in e.value.hint
            assert not (tmp_path / name).exists()
            # Without the engine it still bundles: weights + skeleton for the farm and the ONNX Runtime fallback.
            opts = dataclasses.replace(opts, weightful=False)
        result = build_bundle(path, tmp_path / name, options=opts, probe=no_gpu)
        assert verify_bundle(result.bundle_dir) == [], name
        assert bool(result.manifest.engines) == (name not in SILERO_TRT_RTX_FAILS)


# --------------------------------------------------------------------------- bad input
def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")], "a temp build dir was left behind"


def test_not_an_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(ModelError, match="model.onnx"):
        build_bundle(bad, tmp_path / "out", options=make_options(), probe=no_gpu)
    _no_leftovers(tmp_path, "out")


def test_missing_external_data(tmp_path: Path) -> None:
    model = models.make_external(tmp_path)
    (tmp_path / models.EXTERNAL_DATA_NAME).unlink()
    with pytest.raises(ModelError, match=models.EXTERNAL_DATA_NAME):
        build_bundle(model, tmp_path / "out", options=options_for({"x": ((1, 64), (4, 64), (16, 64))}), probe=no_gpu)
    _no_leftovers(tmp_path, "out")


def test_unsupported_op_surfaces_the_parser_error_with_the_node(tmp_path: Path) -> None:
    model = models.make_unsupported(tmp_path)
    with pytest.raises(EngineBuildError) as e:
        build_bundle(model, tmp_path / "out", options=options_for(models.UNSUPPORTED_PROFILE), probe=no_gpu)
    assert "could not parse" in str(e.value) and models.UNSUPPORTED_OP in str(e.value) and "determinant" in str(e.value)
    _no_leftovers(tmp_path, "out")


def test_dynamic_input_without_profile(tmp_path: Path) -> None:
    model = models.make_conv(tmp_path)
    with pytest.raises(ConfigError) as e:
        build_bundle(model, tmp_path / "out", options=make_options(sms=SMS), probe=no_gpu)
    assert (
        "'input'" in str(e.value) and "[batch, 3, height, width]" in str(e.value) and "--shape input=" in e.value.hint
    )
    _no_leftovers(tmp_path, "out")


def test_profile_errors_against_the_model(tmp_path: Path) -> None:
    model = models.make_mlp(tmp_path)
    with pytest.raises(ConfigError, match="rank 2"):
        build_bundle(model, tmp_path / "out", options=make_options(shapes=["x=1x64x1:2x64x1:4x64x1"]), probe=no_gpu)
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        make_options(shapes=["x=8x64:4x64:16x64"])
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        make_options(shapes=["x=1x64:32x64:16x64"])
    _no_leftovers(tmp_path, "out")


# --------------------------------------------------------------------------- output directory
def test_non_empty_output_dir_is_refused_and_left_intact(tmp_path: Path) -> None:
    model = models.make_fixed(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty") as e:
        build_bundle(model, out, options=make_options(sms=SMS), probe=no_gpu)
    assert "--force" in e.value.hint
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    _no_leftovers(tmp_path, "out.x")  # no temp dirs either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_force_replaces_only_the_bundles_own_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "sibling.txt").write_text("beside")
    first = build_bundle(
        models.make_mlp(tmp_path / "m"), out, options=options_for({"x": ((1, 64), (4, 64), (16, 64))}), probe=no_gpu
    )
    (out / "notes.txt").write_text("mine")
    (out / "engines" / "README").write_text("also mine")
    second = build_bundle(
        models.make_fixed(tmp_path / "m"), out, options=make_options(sms=SMS, force=True), probe=no_gpu
    )
    assert (tmp_path / "sibling.txt").read_text() == "beside"
    assert (out / "notes.txt").read_text() == "mine" and (out / "engines" / "README").read_text() == "also mine"
    assert sorted(second.left_alone) == ["engines/README", "notes.txt"]
    old = {r.path for _, r in first.manifest.files()} - {r.path for _, r in second.manifest.files()}
    assert old and not any((out / p).exists() for p in old), "the old bundle's files must go"
    problems = verify_bundle(out)
    assert sorted(p.path for p in problems) == ["engines/README", "notes.txt"] and {p.kind for p in problems} == {
        "extra"
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out", "sibling.txt"]


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        build_bundle(models.make_fixed(tmp_path), tmp_path / "out", options=make_options(force=True), probe=no_gpu)


# --------------------------------------------------------------------------- engine plans
def _machine(sm: int, index: int = 0, driver_problem: str | None = None) -> SimpleNamespace:
    gpu = SimpleNamespace(index=index, name=f"Fake GPU sm{sm}", sm=sm)
    return SimpleNamespace(gpus=(gpu,), driver_problem=lambda: driver_problem)


def test_weightless_engine_planned_only_for_a_supported_local_gpu() -> None:
    notes: list[str] = []
    plans = plan_engines(make_options(sms=SMS), probe=lambda: _machine(89), note=notes.append)
    assert [(p.kind, p.compute_capabilities) for p in plans] == [("weightful", (86, 89)), ("weightless", (89,))]
    assert notes == []
    for machine in (_machine(90), no_gpu()):  # Hopper: not a TRT-RTX target
        plans = plan_engines(make_options(sms=SMS), probe=lambda m=machine: m, note=notes.append)
        assert [p.kind for p in plans] == ["weightful"]
    assert notes == [NO_GPU_NOTE, NO_GPU_NOTE]


def test_probe_failure_or_old_driver_is_a_note_not_a_crash() -> None:
    notes: list[str] = []

    def broken() -> None:
        raise RuntimeError("driver exploded")

    assert plan_engines(make_options(weightful=False), probe=broken, note=notes.append) == []
    assert (
        plan_engines(
            make_options(weightful=False),
            probe=lambda: _machine(89, driver_problem="driver too old"),
            note=notes.append,
        )
        == []
    )
    assert notes == [NO_GPU_NOTE, "weightless engine not built: driver too old"]


def test_real_probe_on_this_machine_does_not_crash() -> None:
    notes: list[str] = []
    plans = plan_engines(make_options(), note=notes.append)
    assert plans[0].kind == "weightful"
    if not any(p.kind == "weightless" for p in plans):
        assert (
            len(notes) == 1
            and notes[0].startswith("no GPU that TensorRT for RTX supports here")
            or notes[0].startswith("weightless")
        )


@pytest.mark.skipif(os.name == "nt", reason="checks the cross-OS target from Linux")
def test_windows_engine_from_linux(tmp_path: Path) -> None:
    """TRT-RTX 1.7.1 builds a Windows engine on this CPU-only Linux machine (observed). NVIDIA documents AOT engines
    as portable across Windows and Linux, and here the bytes come out identical: one file, two manifest entries."""
    opts = dataclasses.replace(make_options(sms=SMS), platforms=("linux_x86_64", "windows_amd64"))
    result = build_bundle(models.make_fixed(tmp_path), tmp_path / "out", options=opts, probe=no_gpu)
    engines = result.manifest.engines
    assert [e.platform for e in engines] == ["linux_x86_64", "windows_amd64"]
    assert engines[0].file == engines[1].file
    assert verify_bundle(result.bundle_dir) == []


def test_output_dir_given_as_dot_or_with_a_trailing_slash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = models.make_fixed(tmp_path / "m")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    result = build_bundle(model, ".", options=make_options(sms=SMS), probe=no_gpu)
    assert result.bundle_dir == tmp_path / "here" and verify_bundle(tmp_path / "here") == []
    build_bundle(model, "../slash/", options=make_options(sms=SMS), probe=no_gpu)
    assert verify_bundle(tmp_path / "slash") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "m", "slash"]


def test_output_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputDirError, match="symbolic link"):
        build_bundle(models.make_fixed(tmp_path / "m"), tmp_path / "link", options=make_options(), probe=no_gpu)


@pytest.mark.parametrize(
    "installed, flavour",
    [
        ({"tensorrt-rtx-cu12-bindings": "1.7.1.116"}, "cu12"),
        ({"tensorrt-rtx-cu13": "1.7.1.116", "tensorrt-rtx": "1.7.1.116"}, "cu13"),
        ({"tensorrt-rtx": "1.7.1.116"}, "cu13"),
    ],
)
def test_build_and_probe_agree_on_the_cuda_flavour(monkeypatch, installed, flavour):
    """A bundle built here must name the flavour that farm-job and the shim on this machine will see."""
    from bundler.engines import trt_rtx_identity
    from runtime_shim import machine

    # what the dist-info scan (machine._dist_versions) would find with only these distributions installed
    monkeypatch.setattr(machine, "_dist_versions", lambda names: {n: v for n, v in installed.items() if n in names})
    assert trt_rtx_identity()[1] == flavour
    assert machine.trt_rtx_install() == ("1.7.1.116", flavour)
