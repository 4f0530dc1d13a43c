"""Hole 2 of issue 11: the fallback trusts nothing from an earlier load, and no user-cache state crosses bundles.

Real bundles, real files, real processes: a byte flipped after a first load, two bundles that share their files
but not their manifests, a deleted weight file under ``trtx-bundle run``, skeletons that point elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime_shim
from runtime_shim.errors import IntegrityError
from runtime_shim.manifest import read_manifest

sys.path.insert(0, str(Path(__file__).parent))
import models

from bundler.build import build_bundle
from bundler.config import BuildOptions

ROOT = Path(__file__).resolve().parent.parent
FEEDS = {"x": np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)}


def _two_layer(folder: Path, *, swapped: bool = False) -> Path:
    """y = relu(x @ w1) @ w2, with w1 and w2 the same shape (a manifest can swap their blobs)."""
    rng = np.random.default_rng(11)
    w1, w2 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    if swapped:
        w1, w2 = w2, w1
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "two_layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("swapped.onnx" if swapped else "model.onnx")
    onnx.save(model, str(path))
    return path


def _ort(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, FEEDS)[0]


@pytest.fixture
def bundle(tmp_path) -> tuple[Path, Path]:
    onnx_path = _two_layer(tmp_path / "src")
    out = tmp_path / "bundle"
    build_bundle(
        onnx_path,
        out,
        options=BuildOptions(
            profiles=models.as_profiles({"x": ((1, 64), (2, 64), (4, 64))}), weightful=False, weightless=False
        ),
    )
    return out, onnx_path


def _load(bundle: Path, cache: Path, **kw) -> np.ndarray:
    with runtime_shim.load(bundle, "T", cache_dir=cache, **kw) as s:
        assert s.backend == "onnxruntime"
        return s.run(FEEDS)["y"]


def _weights(bundle: Path) -> Path:
    m, _ = read_manifest(bundle)
    return bundle / m.weights.file.path


@pytest.mark.parametrize("verify_weights", ["once", "always"])
def test_a_byte_flipped_after_a_first_load_is_refused_on_the_next(bundle, tmp_path, verify_weights) -> None:
    path, onnx_path = bundle
    np.testing.assert_array_equal(_load(path, tmp_path / "c", verify_weights=verify_weights), _ort(onnx_path))
    m, _ = read_manifest(path)
    frame = m.weights.blobs[m.weights.tensor("w2").blob].frames[0]
    weights = _weights(path)
    st = os.stat(weights)
    with open(weights, "r+b") as f:  # in place, size and times kept: nothing but the bytes tells
        f.seek(frame.offset + frame.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    for _ in range(2):  # and on every load after that
        with pytest.raises(IntegrityError) as e:
            _load(path, tmp_path / "c", verify_weights=verify_weights)
        assert str(weights) in str(e.value) and "frame 0" in str(e.value) and "'w2'" in str(e.value)


def _reread_as_planes(bundle: Path, name: str) -> np.ndarray:
    """Rewrite the manifest so that tensor ``name``'s plain zstd frames read as byte planes of 4 (layout 1: the same
    stored bytes, whose sha256 still match, decode to other weights), its raw sha256 re-pinned: a consistent
    manifest over the same files that means other weights. Returns what the tensor then holds."""
    doc = json.loads((bundle / "manifest.json").read_text())
    w = doc["weights"]
    blob = w["blobs"][next(t["blob"] for t in models.model0(doc)["tensors"] if t["name"] == name)]
    assert blob["encoding"] == "zstd"
    raw = np.frombuffer(_raw_of(bundle, name), dtype=np.uint8)
    planes = raw.reshape(4, -1).T.reshape(-1)  # element i, byte k = plane k, element i
    blob["encoding"], blob["element_size"] = "zstd-byteplane", 4
    blob["sha256"] = hashlib.sha256(planes.tobytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    return planes.view(np.float32).reshape(64, 64)


def _raw_of(bundle: Path, name: str) -> bytes:
    from runtime_shim.store.reader import WeightReader

    m, _ = read_manifest(bundle)
    with WeightReader(bundle, m.weights) as r:
        return r.read_tensor(name).tobytes()


def test_bundles_sharing_files_with_other_manifests_each_give_their_own_outputs(tmp_path) -> None:
    onnx_path = _two_layer(tmp_path / "src")
    first, second = tmp_path / "first", tmp_path / "second"
    profiles = models.as_profiles({"x": ((1, 64), (2, 64), (4, 64))})
    build_bundle(
        onnx_path, first, options=BuildOptions(profiles=profiles, weightful=False, weightless=False, encoding="zstd")
    )
    shutil.copytree(first, second, copy_function=os.link)  # the very same files (hard links)...
    (second / "manifest.json").unlink()
    shutil.copy(first / "manifest.json", second / "manifest.json")
    w2 = _reread_as_planes(second, "w2")  # ...under a manifest that reads one tensor's frames another way
    assert os.path.samefile(_weights(first), _weights(second))
    other = onnx.load(str(onnx_path))
    next(t for t in other.graph.initializer if t.name == "w2").CopyFrom(numpy_helper.from_array(w2, "w2"))
    onnx.save(other, str(tmp_path / "src" / "second.onnx"))
    want_first, want_second = _ort(onnx_path), _ort(tmp_path / "src" / "second.onnx")
    assert not np.array_equal(want_first, want_second)
    cache = tmp_path / "c"  # one user, one cache dir
    for _ in range(2):
        np.testing.assert_array_equal(_load(first, cache), want_first)
        np.testing.assert_array_equal(_load(second, cache), want_second)


def test_a_manifest_that_maps_a_tensor_elsewhere_than_the_skeleton_is_refused(bundle, tmp_path) -> None:
    # Same files, a manifest that gives w2 the blob of w1: TRT-RTX refit would follow the manifest, ONNX Runtime the
    # skeleton; the two would run different models, so the bundle is refused, and the first still runs.
    first, onnx_path = bundle
    second = tmp_path / "second"
    shutil.copytree(first, second)
    doc = json.loads((second / "manifest.json").read_text())
    tensors = {t["name"]: t for t in models.model0(doc)["tensors"]}
    tensors["w2"]["blob"] = tensors["w1"]["blob"]
    (second / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    np.testing.assert_array_equal(_load(first, tmp_path / "c"), _ort(onnx_path))
    with pytest.raises(IntegrityError, match="'w2': the skeleton says float32 \\[64, 64\\] in blob"):
        _load(second, tmp_path / "c")
    np.testing.assert_array_equal(_load(first, tmp_path / "c"), _ort(onnx_path))


def test_a_deleted_weight_file_fails_trtx_bundle_run(bundle, tmp_path) -> None:
    path, _ = bundle
    np.save(tmp_path / "x.npy", FEEDS["x"])
    cmd = [
        sys.executable,
        "-c",
        "from bundler.cli import main; main()",
        "run",
        str(path),
        "--input",
        f"x={tmp_path / 'x.npy'}",
    ]
    cmd += ["--cache-dir", str(tmp_path / "c")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-800:]
    weights = _weights(path)
    weights.unlink()
    for verify in ("once", "always"):
        r = subprocess.run([*cmd, "--verify-weights", verify], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-800:]
        assert "ERROR" in r.stderr and str(weights) in r.stderr and "missing" in r.stderr


def _repin_skeleton(bundle: Path, edit) -> None:
    """Change the skeleton with ``edit(ModelProto)`` and pin the result in the manifest, as a forger would."""
    doc = json.loads((bundle / "manifest.json").read_text())
    ref = models.model0(doc)["skeleton"]["file"]
    model = onnx.load_from_string((bundle / ref["path"]).read_bytes())
    edit(model)
    data = model.SerializeToString()
    sha = hashlib.sha256(data).hexdigest()
    (bundle / ref["path"]).unlink()
    ref["path"], ref["sha256"], ref["size"] = f"skeleton/{sha}.onnx", sha, len(data)
    (bundle / ref["path"]).write_bytes(data)
    (bundle / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))


def _set_external(key: str, value: str):
    def edit(model: onnx.ModelProto) -> None:
        t = next(t for t in model.graph.initializer if t.name == "w2")
        next(e for e in t.external_data if e.key == key).value = value

    return edit


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set_external("location", "../../../etc/passwd"), "keeps its data in '../../../etc/passwd'"),
        (_set_external("location", "*/_ORT_MEM_ADDR_/*"), "keeps its data in '\\*/_ORT_MEM_ADDR_/\\*'"),
        (_set_external("offset", "4096"), "which is no blob of the manifest's weight store"),
        (_set_external("length", "64"), "which is no blob of the manifest's weight store"),
    ],
)
def test_a_skeleton_that_points_elsewhere_is_refused(bundle, tmp_path, monkeypatch, edit, expected) -> None:
    path, _ = bundle
    _repin_skeleton(path, edit)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(bytes(1 << 20))  # what ONNX Runtime would read from the current dir
    with pytest.raises(IntegrityError, match=expected):
        _load(path, tmp_path / "c")


def test_a_skeleton_and_manifest_that_disagree_on_a_shape_are_refused(bundle, tmp_path) -> None:
    path, _ = bundle
    doc = json.loads((path / "manifest.json").read_text())
    next(t for t in models.model0(doc)["tensors"] if t["name"] == "w2")["shape"] = [32, 128]  # same bytes, other shape
    (path / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    with pytest.raises(IntegrityError, match=r"'w2': the skeleton says float32 \[64, 64\] in blob \d+, the manifest"):
        _load(path, tmp_path / "c")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("fifo", "is a FIFO"),
        ("directory", "is a directory"),
        ("longer", "the file has \\d+ bytes"),
        ("missing", "missing"),
    ],
)
def test_a_skeleton_that_is_not_the_pinned_file_is_refused_before_reading(bundle, tmp_path, kind, expected) -> None:
    path, _ = bundle
    m, _ = read_manifest(path)
    skeleton = path / m.skeleton.file.path
    data = skeleton.read_bytes()
    skeleton.unlink()
    if kind == "fifo":
        os.mkfifo(skeleton)  # a read would wait forever for a writer
    elif kind == "directory":
        skeleton.mkdir()
    elif kind == "longer":
        skeleton.write_bytes(data + bytes(10))
    with pytest.raises(IntegrityError, match=expected) as e:
        _load(path, tmp_path / "c")
    assert str(skeleton) in str(e.value)
