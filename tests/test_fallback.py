"""The ONNX Runtime fallback: materializing skeleton + weights (once, verified, by several processes at once)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime_shim.errors import BackendUnavailableError, IntegrityError
from runtime_shim.fallback import MODEL_NAME, OrtSession, materialize_model, model_folder_name
from runtime_shim.manifest import read_manifest
from runtime_shim.user_cache import LAYOUT, UserCache

sys.path.insert(0, str(Path(__file__).parent))
import models

from bundler.build import build_bundle
from bundler.config import BuildOptions

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def external(tmp_path):
    """The external-data test model (weights in a side file), bundled without engines."""
    name, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == "external")
    onnx_path = factory(tmp_path)
    build_bundle(
        onnx_path,
        tmp_path / "bundle",
        options=BuildOptions(profiles=models.as_profiles(prof), weightful=False, weightless=False),
    )
    m, _ = read_manifest(tmp_path / "bundle")
    return tmp_path / "bundle", m, onnx_path, models.sample_inputs(name, prof, onnx_path)


def test_materialized_model_runs_like_the_original(external, tmp_path) -> None:
    bundle, m, onnx_path, feeds = external
    path, tmp = materialize_model(m, bundle, UserCache("T", tmp_path / "c"))
    assert tmp is None and path.parent.name == model_folder_name(m) and path.name == MODEL_NAME
    assert (path.parent / m.skeleton.external_data).stat().st_size == m.weights.raw_size
    want = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_made_once_then_reused(external, tmp_path, monkeypatch) -> None:
    bundle, m, _, _ = external
    cache = UserCache("T", tmp_path / "c")
    first, _ = materialize_model(m, bundle, cache)

    def boom(*a, **k):
        raise AssertionError("unpacked again")

    monkeypatch.setattr("runtime_shim.store.reader.WeightReader.unpack_raw", boom)
    assert materialize_model(m, bundle, cache)[0] == first


def test_a_damaged_materialized_model_is_not_used(external, tmp_path, caplog) -> None:
    bundle, m, onnx_path, feeds = external
    cache = UserCache("T", tmp_path / "c")
    first, _ = materialize_model(m, bundle, cache)
    with open(first.parent / m.skeleton.external_data, "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING, "runtime_shim"):
        path, tmp = materialize_model(m, bundle, cache)
    assert tmp is not None and path.parent == tmp and "damaged" in caplog.text
    session = OrtSession.__new__(OrtSession)  # run the rebuilt copy through the same code path as load()
    session._tmp = tmp
    session.close()
    assert not tmp.exists()


def test_missing_skeleton_is_an_integrity_error(external, tmp_path) -> None:
    bundle, m, _, _ = external
    (bundle / m.skeleton.file.path).unlink()
    with pytest.raises(IntegrityError, match="missing \\(pinned by skeleton.file\\)"):
        materialize_model(m, bundle, UserCache("T", tmp_path / "c"))


def test_without_onnxruntime_the_error_says_what_to_install(external, tmp_path, monkeypatch) -> None:
    bundle, m, _, _ = external
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match="ONNX Runtime is not installed") as e:
        OrtSession(m, bundle, UserCache("T", tmp_path / "c"))
    assert "onnxruntime" in e.value.hint


def test_processes_materializing_at_once_make_one_folder(external, tmp_path) -> None:
    bundle, m, _, feeds = external
    code = textwrap.dedent(f"""
        import numpy as np, runtime_shim
        with runtime_shim.load({str(bundle)!r}, "T", cache_dir={str(tmp_path / "c")!r}) as s:
            out = s.run({{"x": np.ones((2, 64), np.float32)}})
            print("OK", s.backend, float(next(iter(out.values())).sum()))
    """)
    # Keep the caller's PYTHONPATH: where the dependencies come from a --target dir, the child needs it too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    assert len({o[0] for o in outs}) == 1 and outs[0][0].startswith("OK onnxruntime")
    assert [p.name for p in (tmp_path / "c" / LAYOUT / "models").iterdir()] == [model_folder_name(m)]
