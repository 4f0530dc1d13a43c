"""The ONNX Runtime fallback: the model from memory (no copy on disk), exactly ONNX Runtime's outputs, temp dirs swept."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime_shim.fallback as fallback
from runtime_shim.errors import BackendUnavailableError, IntegrityError
from runtime_shim.fallback import MODEL_NAME, TEMP_PREFIX, OrtSession, load_in_memory, model_on_disk
from runtime_shim.manifest import read_manifest
from runtime_shim.skeleton_refs import external_refs, inline_refs
from runtime_shim.user_cache import LAYOUT, UserCache

sys.path.insert(0, str(Path(__file__).parent))
import models

from bundler.build import build_bundle
from bundler.config import BuildOptions

ROOT = Path(__file__).resolve().parent.parent


def _bundle(onnx_path: Path, out: Path, prof) -> Path:
    build_bundle(
        onnx_path, out, options=BuildOptions(profiles=models.as_profiles(prof), weightful=False, weightless=False)
    )
    return out


def _ort(path_or_bytes, feeds: dict) -> list[np.ndarray]:
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def _same_as_original(bundle: Path, onnx_path: Path, feeds: dict, cache: UserCache) -> None:
    m, _ = read_manifest(bundle)
    session = OrtSession(m, bundle, cache)
    try:
        got = session.run(feeds)
    finally:
        session.close()
    for name, want in zip(session.output_names, _ort(onnx_path, feeds)):
        np.testing.assert_array_equal(got[name], want)


def _files_over(folder: Path, size: int) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size > size] if folder.exists() else []


@pytest.fixture
def external(tmp_path):
    """The external-data test model (weights in a side file), bundled without engines."""
    name, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == "external")
    onnx_path = factory(tmp_path)
    bundle = _bundle(onnx_path, tmp_path / "bundle", prof)
    m, _ = read_manifest(bundle)
    return bundle, m, onnx_path, models.sample_inputs(name, prof, onnx_path)


@pytest.mark.parametrize("name", [m[0] for m in models.ALL_BUNDLABLE])
def test_every_test_model_runs_like_the_original_with_nothing_on_disk(name, tmp_path) -> None:
    _, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == name)
    onnx_path = factory(tmp_path)
    bundle = _bundle(onnx_path, tmp_path / "bundle", prof)
    _same_as_original(bundle, onnx_path, models.sample_inputs(name, prof, onnx_path), UserCache("T", tmp_path / "c"))
    assert not _files_over(tmp_path / "c", 1000), "no copy of the model in the user cache"


@pytest.mark.parametrize("factory", [models.make_if_weights, models.make_nested_if, models.make_loop_weights])
def test_subgraph_weights_run_like_the_original(factory, tmp_path) -> None:
    onnx_path = factory(tmp_path)
    model = onnx.load(str(onnx_path))
    feeds = {}
    for i in model.graph.input:
        t = i.type.tensor_type
        shape = [d.dim_value or 2 for d in t.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        feeds[i.name] = (
            np.ones(shape, dtype)
            if dtype == np.bool_
            else np.linspace(-1, 1, int(np.prod(shape))).astype(dtype).reshape(shape)
        )
    profile = {i: ((*f.shape,), (*f.shape,), (*f.shape,)) for i, f in feeds.items() if f.ndim}
    bundle = _bundle(onnx_path, tmp_path / "bundle", profile or None)
    _same_as_original(bundle, onnx_path, feeds, UserCache("T", tmp_path / "c"))


def _typed_model(folder: Path) -> Path:
    """y = x @ cast(wb) + x @ w: a bfloat16 weight (not a numpy type ONNX Runtime takes by name, so it goes inline),
    a float32 one, and a large initializer that nothing reads (ONNX Runtime drops those before taking names)."""
    import ml_dtypes

    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    wb = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    bf = helper.make_tensor("wb", TensorProto.BFLOAT16, [64, 64], wb.view(np.uint16).tobytes(), raw=True)
    unused = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "unused")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["wb"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "wf"], ["a"]),
            helper.make_node("MatMul", ["x", "w"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "typed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "w"), bf, unused],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    path = folder / "typed.onnx"
    onnx.save(model, str(path))
    return path


def test_inline_types_and_unused_initializers(tmp_path) -> None:
    pytest.importorskip("ml_dtypes")
    onnx_path = _typed_model(tmp_path)
    bundle = _bundle(onnx_path, tmp_path / "bundle", {"x": ((1, 64), (2, 64), (4, 64))})
    m, _ = read_manifest(bundle)
    model = load_in_memory(m, bundle)
    assert model.names == ["w"], "bfloat16 and unread tensors go inline, the rest by name"
    assert [r.name for r in external_refs(model.skeleton, "s")[0]] == ["w"]
    feeds = {"x": np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)}
    _same_as_original(bundle, onnx_path, feeds, UserCache("T", tmp_path / "c"))


def test_a_whole_model_inline_runs_like_the_original(external) -> None:
    # What the session falls back to where ONNX Runtime will not take a tensor by name.
    bundle, m, onnx_path, feeds = external
    whole = load_in_memory(m, bundle).all_inline()
    assert external_refs(whole, "whole")[0] == []
    for a, b in zip(_ort(whole, feeds), _ort(onnx_path, feeds)):
        np.testing.assert_array_equal(a, b)


def test_where_onnx_runtime_refuses_names_the_model_opens_inline(external, tmp_path, monkeypatch, caplog) -> None:
    bundle, m, onnx_path, feeds = external
    real = fallback._open

    def refuse_names(ort_, skeleton, names, arrays, threads):
        if names:
            raise RuntimeError("Failed to find existing initializer with name fc1.weight")
        return real(ort_, skeleton, names, arrays, threads)

    monkeypatch.setattr(fallback, "_open", refuse_names)
    with caplog.at_level(logging.INFO, "runtime_shim"):
        session = OrtSession(m, bundle, UserCache("T", tmp_path / "c"))
    assert "opening the model with them inline" in caplog.text
    for name, want in zip(session.output_names, _ort(onnx_path, feeds)):
        np.testing.assert_array_equal(session.run(feeds)[name], want)


def test_skeleton_refs_match_onnx(external) -> None:
    bundle, m, _, _ = external
    skeleton = (bundle / m.skeleton.file.path).read_bytes()
    proto = onnx.load_from_string(skeleton)
    want = {t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    refs, used = external_refs(skeleton, "s")
    assert {r.name for r in refs} == want and all(r.main for r in refs)
    assert used >= {i for n in proto.graph.node for i in n.input}
    same = inline_refs(skeleton, "s", lambda r: None)
    assert same == skeleton, "nothing inlined: the very bytes that were verified"
    with pytest.raises(IntegrityError, match="not a readable ONNX model"):
        external_refs(skeleton[: len(skeleton) // 2], "s")  # cut inside the graph


def test_missing_skeleton_is_an_integrity_error(external, tmp_path) -> None:
    bundle, m, _, _ = external
    (bundle / m.skeleton.file.path).unlink()
    with pytest.raises(IntegrityError, match="missing \\(pinned by skeleton.file\\)"):
        OrtSession(m, bundle, UserCache("T", tmp_path / "c"))


def test_without_onnxruntime_the_error_says_what_to_install(external, tmp_path, monkeypatch) -> None:
    bundle, m, _, _ = external
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match="ONNX Runtime is not installed") as e:
        OrtSession(m, bundle, UserCache("T", tmp_path / "c"))
    assert "onnxruntime" in e.value.hint


def test_model_on_disk_is_verified_runnable_and_removed(external, tmp_path) -> None:
    bundle, m, onnx_path, feeds = external
    cache = UserCache("T", tmp_path / "c")
    with model_on_disk(m, bundle, cache) as path:
        assert path.name == MODEL_NAME and path.parent.parent == cache.root / "tmp"
        for a, b in zip(_ort(path, feeds), _ort(onnx_path, feeds)):
            np.testing.assert_array_equal(a, b)
    assert not path.parent.exists()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir should be")
    with model_on_disk(m, bundle, UserCache("T", blocker / "c")) as path:  # no cache dir: the system temp dir
        assert path.is_file() and path.parent.name.startswith(TEMP_PREFIX)
    assert not path.parent.exists()


def test_a_temp_model_left_by_a_killed_process_is_swept(external, tmp_path) -> None:
    bundle, m, _, _ = external
    cache_dir = tmp_path / "c"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from runtime_shim.fallback import model_on_disk
        from runtime_shim.manifest import read_manifest
        from runtime_shim.user_cache import UserCache
        m, _ = read_manifest({str(bundle)!r})
        with model_on_disk(m, Path({str(bundle)!r}), UserCache("T", {str(cache_dir)!r})) as path:
            print(path.parent, flush=True)
            time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        left = Path(proc.stdout.readline().strip())
        assert left.is_dir()
        old = time.time() - 3600
        os.utime(left, (old, old))
        with model_on_disk(m, bundle, UserCache("T", cache_dir)):
            assert left.is_dir(), "a live owner's dir survives"
    finally:
        proc.kill()
        proc.wait()
    with model_on_disk(m, bundle, UserCache("T", cache_dir)) as path:
        assert not left.exists(), "the dead owner's dir is swept"
        assert [p.name for p in path.parent.parent.iterdir()] == [path.parent.name]


def test_model_copies_of_earlier_versions_are_removed(external, tmp_path) -> None:
    bundle, m, _, _ = external
    cache = UserCache("T", tmp_path / "c")
    old_copy = cache.root / "models" / "0123-abcd"
    old_copy.mkdir(parents=True)
    (old_copy / "weights.bin").write_bytes(bytes(50_000))
    young = cache.root / "models" / ".being-made"
    young.mkdir()
    old = time.time() - 3600
    os.utime(old_copy, (old, old))
    OrtSession(m, bundle, cache).close()
    assert not old_copy.exists() and young.exists(), "an old copy goes; one an earlier version may be filling stays"


def test_processes_loading_at_once_agree_and_keep_nothing(external, tmp_path) -> None:
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
    assert not (tmp_path / "c" / LAYOUT / "models").exists() and not _files_over(tmp_path / "c", 1000)
