"""`trtx-bundle run` and `trtx-bundle doctor` through click's runner, on real bundles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bundler.build import build_bundle
from bundler.cli import main
from bundler.config import BuildOptions

sys.path.insert(0, str(Path(__file__).parent))
import models


@pytest.fixture
def conv(tmp_path):
    name, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == "conv")
    onnx_path = factory(tmp_path)
    build_bundle(
        onnx_path, tmp_path / "bundle", options=BuildOptions(profiles=models.as_profiles(prof), weightless=False)
    )
    feeds = models.sample_inputs(name, prof, onnx_path)
    for k, v in feeds.items():
        np.save(tmp_path / f"{k}.npy", v)
    return tmp_path / "bundle", onnx_path, feeds


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        return CliRunner()


def test_doctor_without_a_bundle(tmp_path) -> None:
    r = _runner().invoke(main, ["doctor", "--cache-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "TensorRT for RTX" in r.stdout and ("can run here" in r.stdout or "cannot run here" in r.stdout)
    r = _runner().invoke(main, ["doctor", "--json", "--cache-dir", str(tmp_path)])
    report = json.loads(r.stdout)
    assert set(report) >= {"machine", "trt_rtx_can_run", "why_not", "cache_dir", "weights_decoded_on_gpu"}
    assert report["trt_rtx_can_run"] == (report["why_not"] is None)
    gpu_decode = report["weights_decoded_on_gpu"]
    assert gpu_decode["possible"] == (gpu_decode["why_not"] is None) and gpu_decode["possible"] == (
        gpu_decode["nvcomp"] is not None
    )
    r = _runner().invoke(main, ["doctor", "--cache-dir", str(tmp_path)])
    assert (
        "refit weights: decoded on the GPU"
        if gpu_decode["possible"]
        else f"refit weights: decoded on the CPU, {gpu_decode['why_not']}"
    ) in r.stdout
    from runtime_shim.store.reader import native_join

    assert report["host_decoder_compiled"] is native_join()
    assert (
        "CPU weight decoder: compiled helper" if native_join() else "CPU weight decoder: numpy fallback"
    ) in r.stdout


def test_doctor_with_a_bundle_ranks_engines_and_caches(conv, tmp_path) -> None:
    bundle, _, _ = conv
    r = _runner().invoke(main, ["doctor", str(bundle), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "engines (* taken, + usable, - passed over):" in r.stdout and "runtime caches" in r.stdout
    assert "weightful [0]" in r.stdout and "fallback" in r.stdout
    report = json.loads(
        _runner().invoke(main, ["doctor", str(bundle), "--json", "--cache-dir", str(tmp_path / "c")]).stdout
    )
    kinds = [c["kind"] for c in report["bundle"]["engines"]]
    assert {"weightful", "build", "fallback"} <= set(kinds) and sum(
        c["taken"] for c in report["bundle"]["engines"]
    ) == 1


def test_run_saves_outputs_that_match_onnxruntime(conv, tmp_path) -> None:
    bundle, onnx_path, feeds = conv
    out_dir = tmp_path / "out"
    args = ["run", str(bundle), "-o", str(out_dir), "--cache-dir", str(tmp_path / "c")]
    args += [a for k in feeds for a in ("--input", f"{k}={tmp_path / (k + '.npy')}")]
    r = _runner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "backend: " in r.stdout and "output " in r.stdout
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for o, want in zip(ref.get_outputs(), ref.run(None, feeds)):
        got = np.load(out_dir / f"{o.name}.npy")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    r = _runner().invoke(main, args + ["--json"])
    data = json.loads(r.stdout)
    assert data["report"]["backend"] in ("onnxruntime", "tensorrt_rtx") and all(
        "file" in v for v in data["outputs"].values()
    )


def test_run_errors_are_rendered_not_raised(conv, tmp_path) -> None:
    bundle, _, feeds = conv
    name = next(iter(feeds))
    r = _runner().invoke(main, ["run", str(bundle), "--input", "nonsense"])
    assert r.exit_code == 2 and "expected NAME=FILE.npy" in r.stderr
    r = _runner().invoke(
        main, ["run", str(bundle), "--input", f"wrong={tmp_path / (name + '.npy')}", "--cache-dir", str(tmp_path / "c")]
    )
    assert r.exit_code == 1 and r.stderr.startswith("ERROR inputs: expected") and "unexpected ['wrong']" in r.stderr
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    r = _runner().invoke(main, ["run", str(bundle), "--input", f"{name}={tmp_path / 'bad.npy'}"])
    assert r.exit_code == 1 and "cannot read a .npy array" in r.stderr and "hint:" in r.stderr
    r = _runner().invoke(
        main,
        [
            "run",
            str(bundle),
            "--input",
            f"{name}={tmp_path / (name + '.npy')}",
            "--fallback",
            "error",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
    )
    if r.exit_code:  # no GPU TRT-RTX supports here (the usual case)
        assert (
            "ERROR" in r.stderr and "TensorRT for RTX cannot run this bundle here" in r.stderr and "doctor" in r.stderr
        )


def test_the_app_template_runs_a_bundle(conv, tmp_path) -> None:
    import os
    import subprocess

    bundle, _, feeds = conv
    root = Path(__file__).resolve().parent.parent
    args = [f"{k}={tmp_path / (k + '.npy')}" for k in feeds]
    # Keep the caller's PYTHONPATH: where the dependencies come from a --target dir, the child needs it too.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "TRTX_CACHE_DIR": str(tmp_path / "app-cache"),
    }
    r = subprocess.run(
        [sys.executable, str(root / "templates" / "app" / "app.py"), str(bundle), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-1000:]
    assert "backend:" in r.stderr and ": float32 [" in r.stdout
    assert (tmp_path / "app-cache" / "CACHEDIR.TAG").exists()
