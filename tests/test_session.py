"""load() and Session end to end on this CPU machine: every test model and the silero-vad models are bundled, loaded,
run, and compared with ONNX Runtime on the original model; plus input validation and bad bundles."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import runtime_shim
from runtime_shim import Loader
from runtime_shim.errors import BackendUnavailableError, BundleError, InputError, IntegrityError, SchemaVersionError
from runtime_shim.fsutil import atomic_write
from runtime_shim.machine import Gpu, Machine
from runtime_shim.manifest import read_manifest

sys.path.insert(0, str(Path(__file__).parent))
import models

from bundler.build import build_bundle
from bundler.config import BuildOptions

H100 = Gpu(index=0, name="NVIDIA H100 80GB HBM3", pci_device_id=0x2330, uuid="GPU-h", sm=90, total_memory=80 << 30)


def _machine(gpus=(H100,), **kw) -> Machine:
    base = dict(
        os="linux",
        platform="linux_x86_64",
        cpu_arch="x86_64",
        python="3.11",
        trt_rtx_version=runtime_shim.probe().trt_rtx_version,
        cuda_flavour="cu13",
        driver_version="580.95.05",
        driver_cuda_version=13000,
        gpus=gpus,
    )
    base.update(kw)
    return Machine(**base)


def _options(prof, **kw) -> BuildOptions:
    return BuildOptions(profiles=models.as_profiles(prof), weightless=False, **kw)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))) if a.size else 0.0


def _check_against_ort(session, original: Path, feeds: dict) -> None:
    ref = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
    got = session.run(feeds)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        tol = 1e-5 if want.dtype == np.float32 else 1e-3
        assert _max_rel(got[name], want) < tol, name


@pytest.mark.parametrize("name, factory, prof", models.ALL_BUNDLABLE, ids=[m[0] for m in models.ALL_BUNDLABLE])
def test_every_test_model_end_to_end(tmp_path, name, factory, prof) -> None:
    onnx_path = factory(tmp_path)
    build_bundle(onnx_path, tmp_path / "bundle", options=_options(prof))
    with runtime_shim.load(tmp_path / "bundle", "T", cache_dir=tmp_path / "cache") as s:
        # this machine has no NVIDIA driver (CI) or a GPU TRT-RTX refuses: the report must say why
        assert s.backend in ("onnxruntime", "tensorrt_rtx")
        if s.backend == "onnxruntime":
            assert s.report.why_not_trt
        _check_against_ort(s, onnx_path, models.sample_inputs(name, prof, onnx_path))
        if prof:  # the edges of the profile run too
            for edge in (0, 2):
                feeds = {
                    k: np.random.default_rng(edge)
                    .standard_normal(v[edge])
                    .astype(np.float32 if "fp16" not in name else np.float16)
                    for k, v in prof.items()
                }
                _check_against_ort(s, onnx_path, feeds)
        json.dumps(s.report.to_dict())
        assert any("TensorRT for RTX not used" in line or "backend: tensorrt_rtx" in line for line in s.report.lines())


SILERO_PROFILE = {"input": ((1, 576), (1, 576), (4, 576)), "state": ((2, 1, 128), (2, 1, 128), (2, 4, 128))}
SILERO = {"silero_vad_16k_sequence": {"input": ((1, 576), (4, 576), (16, 576))}, "silero_vad_openvino_16k": None}


def _silero_feeds(path: Path, batch: int) -> dict:
    rng, feeds = np.random.default_rng(batch), {}
    for vi in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name == "sr":
            feeds["sr"] = np.array(16000, dtype=np.int64)
        elif vi.name == "input":
            feeds["input"] = (
                rng.standard_normal((batch if not dims or not dims[0] else dims[0], dims[-1] or 576)) * 0.1
            ).astype(np.float32)
        else:
            feeds[vi.name] = (rng.standard_normal([d or batch for d in dims]) * 0.1).astype(np.float32)
    return feeds


def test_silero_models_end_to_end(silero_models, tmp_path) -> None:
    for name, path in sorted(silero_models.items()):
        prof = SILERO.get(name, SILERO_PROFILE)
        build_bundle(path, tmp_path / name, options=_options(prof, weightful=False))
        with runtime_shim.load(tmp_path / name, "T", cache_dir=tmp_path / "cache") as s:
            assert s.backend == "onnxruntime" and s.report.why_not_trt, name
            for batch in (1, 4) if prof else (1,):
                feeds = _silero_feeds(path, batch)
                _check_against_ort(
                    s, path, {k: v for k, v in feeds.items() if k in {i.name for i in s.manifest.inputs}}
                )


@pytest.fixture
def mlp(tmp_path):
    name, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == "mlp")
    onnx_path = factory(tmp_path)
    build_bundle(onnx_path, tmp_path / "bundle", options=_options(prof))
    return tmp_path / "bundle", models.sample_inputs(name, prof, onnx_path)


class _NeverRun:
    def run(self, inputs, profile=0):
        raise AssertionError("the backend ran on invalid inputs")

    def close(self):
        pass


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda f: {"y": f["x"]}, "missing ['x']; unexpected ['y']"),
        (lambda f: {**f, "extra": f["x"]}, "unexpected ['extra']"),
        (lambda f: {"x": f["x"].astype(np.float64)}, "expected dtype float32, got float64"),
        (lambda f: {"x": f["x"][None]}, "expected rank 2"),
        (lambda f: {"x": np.zeros((4, 63), np.float32)}, "axis 1 must be 64, got 63"),
        (
            lambda f: {"x": np.zeros((17, 64), np.float32)},
            "outside the bundle's shape profile (x: shape [17, 64], min [1, 64], max [16, 64])",
        ),
        (lambda f: {"x": f["x"].tolist()}, "expected a numpy array, got list"),
        (lambda f: [f["x"]], "run() takes a dict"),
    ],
)
def test_bad_inputs_fail_before_anything_runs(mlp, tmp_path, change, words) -> None:
    bundle, feeds = mlp
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "cache") as s:
        s._impl = _NeverRun()
        with pytest.raises(InputError) as e:
            s.run(change(feeds))
        assert words in str(e.value)


def _rewrite(bundle: Path, fn) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    fn(data)
    atomic_write(bundle / "manifest.json", json.dumps(data).encode())


def test_unknown_keys_warn_and_a_newer_major_is_refused(mlp, tmp_path, caplog) -> None:
    bundle, feeds = mlp
    _rewrite(bundle, lambda d: d.update(future_field=1))
    with (
        caplog.at_level(logging.WARNING, "runtime_shim"),
        runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c") as s,
    ):
        assert any("future_field: unknown key ignored" in w for w in s.report.warnings)
        s.run(feeds)
    assert "future_field" in caplog.text
    _rewrite(bundle, lambda d: d.update(schema_version=99))
    with pytest.raises(SchemaVersionError, match="schema_version 99 is newer"):
        runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c")


def test_bundle_from_another_trt_rtx_version(mlp, tmp_path) -> None:
    bundle, feeds = mlp
    rtx = Gpu(index=0, name="NVIDIA GeForce RTX 4090", pci_device_id=0x2684, uuid="GPU-r", sm=89, total_memory=24 << 30)

    def older(d):
        d["trt_rtx"]["version"] = "1.6.0.0"
        for e in models.model0(d)["engines"]:
            e["trt_rtx_version"] = "1.6.0.0"

    _rewrite(bundle, older)
    # building here needs a real supported GPU: with none, the report carries both reasons and ONNX Runtime serves
    with Loader(probe=lambda: _machine((rtx,))).load(bundle, "T", cache_dir=tmp_path / "c") as s:
        assert s.backend == "onnxruntime"
        assert "built with TensorRT for RTX 1.6.0.0, but" in s.report.why_not_trt
        assert any("made for TensorRT for RTX 1.6.0.0" in w for w in s.report.warnings)
        s.run(feeds)


def test_unsupported_gpu_fallback_error_says_why(mlp, tmp_path) -> None:
    bundle, feeds = mlp
    with pytest.raises(BackendUnavailableError) as e:
        Loader(probe=_machine).load(bundle, "T", cache_dir=tmp_path / "c", fallback="error")
    assert "compute capability 9.0 (Hopper" in str(e.value) and "doctor" in e.value.hint
    with Loader(probe=_machine).load(bundle, "T", cache_dir=tmp_path / "c") as s:
        assert s.backend == "onnxruntime" and "H100" in s.report.why_not_trt
        assert s.report.gpu["sm_text"] == "9.0" and s.report.gpu["trt_rtx_supported"] is False


@pytest.mark.parametrize("part", ["weights", "skeleton"])
def test_tampered_weights_or_skeleton_are_integrity_errors(mlp, tmp_path, part) -> None:
    bundle, feeds = mlp
    m, _ = read_manifest(bundle)
    ref = m.weights.file if part == "weights" else m.skeleton.file
    data = bytearray((bundle / ref.path).read_bytes())
    data[-20] ^= 0x55
    (bundle / ref.path).write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as e:
        runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c")
    assert ref.path in str(e.value)
    made = tmp_path / "c" / "trtx-v1" / "models"
    assert not made.exists() or not list(made.iterdir()), "nothing half-made is left in the cache"


def test_fallback_keeps_no_model_copy_and_an_unwritable_cache_still_runs(mlp, tmp_path) -> None:
    bundle, feeds = mlp
    for _ in range(2):
        with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c") as s:
            s.run(feeds)
    kept = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    assert not kept, "the fallback reads the bundle itself: no copy of the model in the user cache"
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    with runtime_shim.load(bundle, "T", cache_dir=blocker / "cache") as s:
        s.run(feeds)


def test_session_lifecycle_and_argument_errors(mlp, tmp_path) -> None:
    bundle, feeds = mlp
    s = runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c")
    assert s.serialize_cache() is None and s.save_cache() is False  # nothing to save on ONNX Runtime
    s.close()
    s.close()
    with pytest.raises(BundleError, match="closed session"):
        s.run(feeds)
    with pytest.raises(BundleError, match="specialization"):
        runtime_shim.load(bundle, specialization="fast")
    with pytest.raises(BundleError, match="fallback"):
        runtime_shim.load(bundle, fallback="cpu")
    archive = tmp_path / "bundle.trtx"
    archive.write_bytes(b"x")
    with pytest.raises(BundleError, match="not a bundle archive"):  # a file is read as a .trtx archive
        runtime_shim.load(archive)


def test_exports() -> None:
    assert runtime_shim.load is runtime_shim.session.load and runtime_shim.Loader is runtime_shim.session.Loader
    assert runtime_shim.Session.__name__ == "Session" and callable(runtime_shim.probe)
    assert dataclasses.is_dataclass(runtime_shim.Report) and runtime_shim.Report is runtime_shim.session.Report
    for name in runtime_shim.__all__:
        assert getattr(runtime_shim, name) is not None, name
    assert issubclass(runtime_shim.InputError, runtime_shim.BundleError)
