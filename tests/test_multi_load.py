"""Loading one model of a multi-model bundle: load(model=...), the errors, archives, per-model user caches, weight
blobs two models share read from disk once per process, and `trtx-bundle run/doctor --model`."""

from __future__ import annotations

import collections
import dataclasses
import gc
import hashlib
import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import runtime_shim
from runtime_shim import Loader
from runtime_shim.cache_key import built_engine_name, cache_key_for, model_id
from runtime_shim.errors import IntegrityError, ModelChoiceError
from runtime_shim.fallback import model_on_disk
from runtime_shim.fsutil import atomic_write
from runtime_shim.manifest import Engine, FileRef, read_bundle_manifest
from runtime_shim.refit import StoreWeights
from runtime_shim.shared_weights import REGISTRY, shared_blobs
from runtime_shim.store.reader import WeightReader
from runtime_shim.user_cache import UserCache

sys.path.insert(0, str(Path(__file__).parent))
import models
from test_trt_session import MACHINE, TRT_VERSION, RecordingFakeTrtRuntime

from bundler.archive import pack_bundle
from bundler.build import ModelSpec, build_bundle
from bundler.cli import main
from bundler.config import BuildOptions

PROFILE = {"x": ((1, 64), (4, 64), (16, 64))}
FEEDS = {"x": np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)}


def _finetune(src: Path, out: Path, scale: float = 2.0) -> Path:
    """``src`` with its last layer's weight changed: a fine-tune that shares every other tensor with it."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == "fc2.weight":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, "fc2.weight"))
    onnx.save(model, str(out))
    return out


def _build(out: Path, sources: dict[str, Path], **options) -> Path:
    specs = [ModelSpec(source=p, name=n, profiles=models.as_profiles(PROFILE)) for n, p in sources.items()]
    build_bundle(None, out, options=BuildOptions(weightful=False, weightless=False, **options), models=specs)
    return out


@pytest.fixture
def pair(tmp_path):
    """A bundle of two fine-tunes of the MLP, det and rec, that share three of their four tensors; their sources."""
    det = models.make_mlp(tmp_path / "src")
    rec = _finetune(det, tmp_path / "src" / "rec.onnx")
    return _build(tmp_path / "bundle", {"det": det, "rec": rec}), {"det": det, "rec": rec}


def _ort(onnx_path: Path, feeds: dict) -> dict[str, np.ndarray]:
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def _no_probe():
    raise AssertionError("the machine was probed")


def _frames(bundle: Path) -> dict[str, set[int]]:
    """Model name -> the file offsets of the frames of every blob its tensors use."""
    whole, _, _ = read_bundle_manifest(bundle)
    blobs = whole.weights.blobs
    return {m.name: {f.offset for t in m.tensors for f in blobs[t.blob].frames} for m in whole.models}


@pytest.fixture
def reads(monkeypatch):
    """Every read of the weight file: (resolved path, file offset) -> how many times (WeightReader._read_into)."""
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    original = WeightReader._read_into

    def counting(self, offset, buf):
        seen[(str(self.path.resolve()), offset)] += 1
        return original(self, offset, buf)

    monkeypatch.setattr(WeightReader, "_read_into", counting)
    return seen


def _weight_file(bundle: Path) -> Path:
    return bundle / read_bundle_manifest(bundle)[0].weights.file.path


def _counts(reads, bundle: Path) -> dict[int, int]:
    where = str(_weight_file(bundle).resolve())
    return {offset: n for (path, offset), n in reads.items() if path == where}


# --------------------------------------------------------------------------- choosing the model
def test_several_models_and_no_name_is_an_error_that_lists_them_before_the_probe(pair, tmp_path) -> None:
    bundle, _ = pair
    loader = Loader(probe=_no_probe)
    with pytest.raises(ModelChoiceError) as e:
        loader.load(bundle, "T", cache_dir=tmp_path / "c")
    assert "2 models (det, rec)" in str(e.value) and str(bundle) in str(e.value) and "model=" in e.value.hint
    with pytest.raises(ModelChoiceError) as e:
        loader.load(bundle, "T", cache_dir=tmp_path / "c", model="cls")
    assert "no model named 'cls'" in str(e.value) and "'det', 'rec'" in str(e.value)


def test_a_one_model_bundle_needs_no_name_and_takes_its_own(tmp_path) -> None:
    src = models.make_mlp(tmp_path / "src")
    bundle = tmp_path / "one"
    build_bundle(
        src, bundle, options=BuildOptions(profiles=models.as_profiles(PROFILE), weightless=False, weightful=False)
    )
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c") as s:
        assert s.model == "mlp" and s.report.models == ["mlp"]
        np.testing.assert_array_equal(s.run(FEEDS)["y"], _ort(src, FEEDS)["y"])
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model="mlp") as s:
        assert s.model == "mlp"
    with pytest.raises(ModelChoiceError, match="no model named 'det'"):
        Loader(probe=_no_probe).load(bundle, "T", cache_dir=tmp_path / "c", model="det")


def test_each_model_runs_exactly_like_its_original(pair, tmp_path) -> None:
    bundle, sources = pair
    outs = {}
    for name, src in sources.items():
        with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model=name) as s:
            assert s.backend == "onnxruntime" and s.model == name and s.manifest.model.name == name
            assert s.report.model == name and s.report.models == ["det", "rec"]
            assert f"model {name}; the bundle also holds" in s.report.lines()[0]
            outs[name] = s.run(FEEDS)["y"]
        np.testing.assert_array_equal(outs[name], _ort(src, FEEDS)["y"])
    assert not np.array_equal(outs["det"], outs["rec"])  # each ran its own last layer


# --------------------------------------------------------------------------- shared weights read once
def test_shared_frames_are_read_once_and_freed_with_the_last_session(pair, tmp_path, reads) -> None:
    bundle, sources = pair
    frames = _frames(bundle)
    shared = frames["det"] & frames["rec"]
    assert shared and frames["det"] - shared and frames["rec"] - shared  # three tensors shared, one each its own
    weight_file = _weight_file(bundle)
    det = runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model="det")
    assert _counts(reads, bundle) == dict.fromkeys(frames["det"], 1)
    rec = runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model="rec")
    # rec read only its own frame: the shared ones came from det's session, read and checked once in this process
    assert _counts(reads, bundle) == dict.fromkeys(frames["det"] | frames["rec"], 1)
    whole, _, _ = read_bundle_manifest(bundle)
    used = {t.blob for m in whole.models for t in m.tensors}
    assert REGISTRY.held(weight_file) == (len(used), sum(whole.weights.blobs[i].nbytes for i in used))  # one copy
    np.testing.assert_array_equal(det.run(FEEDS)["y"], _ort(sources["det"], FEEDS)["y"])
    np.testing.assert_array_equal(rec.run(FEEDS)["y"], _ort(sources["rec"], FEEDS)["y"])
    det.close()
    assert REGISTRY.held(weight_file)[0] == len({t.blob for t in whole.models[1].tensors})  # rec's, still in use
    np.testing.assert_array_equal(rec.run(FEEDS)["y"], _ort(sources["rec"], FEEDS)["y"])  # det's close is det's
    rec.close()
    gc.collect()
    assert REGISTRY.held(weight_file) == (0, 0)
    # nothing outlives the sessions: the next load reads (and checks) every frame it uses again
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model="det"):
        assert all(_counts(reads, bundle)[o] == 2 for o in frames["det"])


def test_two_threads_loading_both_models_at_once_read_each_frame_once(pair, tmp_path, reads) -> None:
    bundle, sources = pair
    start = threading.Barrier(2)
    sessions: dict[str, runtime_shim.Session] = {}
    errors: list[BaseException] = []

    def load(name: str) -> None:
        try:
            start.wait()
            sessions[name] = runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model=name)
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=load, args=(n,)) for n in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    frames = _frames(bundle)
    assert _counts(reads, bundle) == dict.fromkeys(frames["det"] | frames["rec"], 1)
    for name, s in sessions.items():
        np.testing.assert_array_equal(s.run(FEEDS)["y"], _ort(sources[name], FEEDS)["y"])
        s.close()


def test_another_copy_of_the_weight_file_is_read_for_itself(pair, tmp_path, reads) -> None:
    bundle, _ = pair
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    whole, _, _ = read_bundle_manifest(copy)
    shared = whole.weights.blobs[whole.models[0].tensors[0].blob].frames[0]  # fc1.weight: both models use it
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model="det"):
        with runtime_shim.load(copy, "T", cache_dir=tmp_path / "c", model="rec"):
            assert _counts(reads, copy)[shared.offset] == 1  # the same pinned bytes elsewhere: not shared
        # a damaged copy is refused although a good copy of the same frame is held in this process
        weights = _weight_file(copy)
        data = bytearray(weights.read_bytes())
        data[shared.offset + shared.size // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(IntegrityError, match="frame 0"):
            runtime_shim.load(copy, "T", cache_dir=tmp_path / "c", model="rec")


def test_host_refit_reads_share_blobs_across_models_and_identical_tensors(pair, reads) -> None:
    bundle, _ = pair
    whole, _, _ = read_bundle_manifest(bundle)
    det, rec = (StoreWeights(v, bundle) for v in whole.views())
    try:
        a, b = det.read("fc1.weight"), rec.read("fc1.weight")
        assert np.shares_memory(a, b) and not a.flags.writeable and not b.flags.writeable
        assert not np.shares_memory(det.read("fc2.weight"), rec.read("fc2.weight"))  # the fine-tuned layer
        with WeightReader(bundle, det.store) as r:
            np.testing.assert_array_equal(a, r.read_tensor("fc1.weight"))
        offsets = [f.offset for f in whole.weights.blobs[det.store.tensor("fc1.weight").blob].frames]
        assert all(_counts(reads, bundle)[o] == 2 for o in offsets)  # once shared, once by the direct read above
    finally:
        det.close()
        rec.close()


# --------------------------------------------------------------------------- user caches per model
class _FakeOfModel(RecordingFakeTrtRuntime):
    """The test_trt_session FAKE of the TRT-RTX runtime; its serialized runtime cache names its model."""

    def __init__(self, manifest, **kw) -> None:
        super().__init__(manifest, **kw)
        self.model = manifest.model.name

    def serialize_cache(self, context):
        self.calls.append(("serialize_cache",))
        return f"kernels of {self.model}".encode()


def _with_stand_in_engines(bundle: Path) -> None:
    """Give every model of the bundle its own weightless engine entry for SM 8.9 (bytes only the fake reads)."""
    whole, _, _ = read_bundle_manifest(bundle)
    for view in whole.views():
        data = f"weightless stand-in for {view.model.name}".encode()
        ref = FileRef.for_content("engines", hashlib.sha256(data).hexdigest(), len(data))
        (bundle / ref.path).parent.mkdir(exist_ok=True)
        atomic_write(bundle / ref.path, data)
        engine = Engine(
            kind="weightless",
            platform="linux_x86_64",
            compute_capabilities=(89,),
            trt_rtx_version=TRT_VERSION,
            file=ref,
        )
        whole = whole.with_view(dataclasses.replace(view, engines=(engine,)))
    atomic_write(bundle / "manifest.json", whole.to_json())


def test_two_models_never_share_a_runtime_cache_or_built_engine_entry(tmp_path) -> None:
    # The same graph under two names that read alike as file names: the skeleton is one file, pinned by both.
    src = models.make_mlp(tmp_path / "src")
    bundle = _build(tmp_path / "bundle", {"enc a": src, "enc_a": src})
    _with_stand_in_engines(bundle)
    whole, _, _ = read_bundle_manifest(bundle)
    a, b = whole.views()
    assert a.skeleton.file == b.skeleton.file
    assert model_id(a) != model_id(b) and built_engine_name(a, 89, "1") != built_engine_name(b, 89, "1")
    cache = UserCache("T", tmp_path / "c")
    key = cache_key_for(MACHINE, MACHINE.gpus[0])
    assert cache.runtime_cache_path(model_id(a), key) != cache.runtime_cache_path(model_id(b), key)

    def load(view):
        fake = _FakeOfModel(view, accept_cache=0)
        loader = Loader(probe=lambda: MACHINE, trt_runtime=lambda device: fake)
        return loader.load(bundle, "T", cache_dir=tmp_path / "c", model=view.model.name, weights_on_device=False), fake

    for view in (a, b):  # each session saves its own cache on close
        s, _ = load(view)
        with s:
            assert s.backend == "tensorrt_rtx" and s.report.runtime_cache is None
    for view in (a, b):
        assert cache.read_runtime_cache(model_id(view), key) == f"kernels of {view.model.name}".encode()
        s, fake = load(view)
        with s:
            assert fake.caches_offered == [f"kernels of {view.model.name}".encode()]
            assert str(s.report.runtime_cache).startswith("user cache")


# --------------------------------------------------------------------------- archives
def test_an_archive_loads_each_model_from_one_unpacked_copy(pair, tmp_path, reads) -> None:
    bundle, sources = pair
    archive = tmp_path / "pair.trtx"
    pack_bundle(bundle, archive)
    with pytest.raises(ModelChoiceError) as e:
        Loader(probe=_no_probe).load(archive, "T", cache_dir=tmp_path / "c")
    assert str(e.value).startswith(f"{archive}: manifest.json: the bundle holds 2 models (det, rec)")
    det = runtime_shim.load(archive, "T", cache_dir=tmp_path / "c", model="det")
    rec = runtime_shim.load(archive, "T", cache_dir=tmp_path / "c", model="rec")
    with det, rec:
        assert det.report.bundle == rec.report.bundle  # the one unpacked copy in the user cache
        unpacked = Path(det.report.bundle)
        frames = _frames(unpacked)
        assert _counts(reads, unpacked) == dict.fromkeys(frames["det"] | frames["rec"], 1)
        for name, s in (("det", det), ("rec", rec)):
            np.testing.assert_array_equal(s.run(FEEDS)["y"], _ort(sources[name], FEEDS)["y"])


# --------------------------------------------------------------------------- the CLI
def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        return CliRunner()


def test_run_needs_model_with_several_and_runs_the_one_named(pair, tmp_path) -> None:
    bundle, sources = pair
    np.save(tmp_path / "x.npy", FEEDS["x"])
    common = ["-i", f"x={tmp_path / 'x.npy'}", "--cache-dir", str(tmp_path / "c")]
    r = _runner().invoke(main, ["run", str(bundle), *common])
    assert r.exit_code == 1 and "ERROR" in r.stderr and "(det, rec)" in r.stderr and "--model" in r.stderr
    r = _runner().invoke(main, ["run", str(bundle), "--model", "nope", *common])
    assert r.exit_code == 1 and "no model named 'nope'" in r.stderr
    r = _runner().invoke(main, ["run", str(bundle), "--model", "rec", *common, "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["report"]["model"] == "rec"
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), _ort(sources["rec"], FEEDS)["y"])


def test_doctor_reports_every_model_or_the_one_named(pair, tmp_path) -> None:
    bundle, _ = pair
    archive = tmp_path / "pair.trtx"
    pack_bundle(bundle, archive)
    for target in (bundle, archive):
        r = _runner().invoke(main, ["doctor", str(target), "--json", "--cache-dir", str(tmp_path / "c")])
        assert r.exit_code == 0, r.stderr
        d = json.loads(r.stdout)["bundle"]
        assert d["model_names"] == ["det", "rec"] and [m["model"] for m in d["models"]] == ["det", "rec"]
        assert all(m["engines"] and m["runtime_caches"] for m in d["models"]) and "engines" not in d
        r = _runner().invoke(main, ["doctor", str(target), "--model", "rec", "--json", "--cache-dir", str(tmp_path)])
        d = json.loads(r.stdout)["bundle"]
        assert d["model"] == "rec" and [m["model"] for m in d["models"]] == ["rec"] and d["engines"]
    r = _runner().invoke(main, ["doctor", str(bundle), "--cache-dir", str(tmp_path / "c")])
    assert (
        r.exit_code == 0 and "2 models: det, rec\nmodel det, made for" in r.stdout and "\nmodel rec, made" in r.stdout
    )
    r = _runner().invoke(main, ["doctor", str(bundle), "--model", "nope"])
    assert r.exit_code == 1 and "no model named 'nope'" in r.stderr
    for args in (["--selftest", "--model", "det"], ["--model", "det"]):
        assert _runner().invoke(main, ["doctor", *args]).exit_code == 2


def test_doctor_lists_each_models_own_engines(tmp_path) -> None:
    # Real AOT builds (weightful, no GPU needed): each model has its own engine, and doctor ranks it for that model.
    det = models.make_mlp(tmp_path / "src")
    conv_profile = models.ALL_BUNDLABLE[0][2]
    specs = [
        ModelSpec(source=det, name="det", profiles=models.as_profiles(PROFILE)),
        ModelSpec(source=models.make_conv(tmp_path / "src"), name="cls", profiles=models.as_profiles(conv_profile)),
    ]
    bundle = tmp_path / "bundle"
    build_bundle(None, bundle, options=BuildOptions(weightless=False), models=specs)
    r = _runner().invoke(main, ["doctor", str(bundle), "--json", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.stderr
    files = {
        m["model"]: {c["file"] for c in m["engines"] if c["kind"] == "weightful"}
        for m in json.loads(r.stdout)["bundle"]["models"]
    }
    whole, _, _ = read_bundle_manifest(bundle)
    assert files == {m.name: {e.file.path for e in m.engines} for m in whole.models}
    assert files["det"] and files["cls"] and not files["det"] & files["cls"]


def test_the_model_on_disk_for_an_engine_build_holds_only_that_models_weights(pair, tmp_path) -> None:
    bundle, sources = pair
    whole, _, _ = read_bundle_manifest(bundle)
    det, rec = whole.views()
    own = {t.blob for t in rec.weights.tensors}
    with model_on_disk(rec, bundle, UserCache("T", tmp_path / "c")) as onnx_path:
        np.testing.assert_array_equal(_ort(onnx_path, FEEDS)["y"], _ort(sources["rec"], FEEDS)["y"])
        raw = (onnx_path.parent / rec.skeleton.external_data).read_bytes()
    assert len(raw) == whole.weights.raw_size
    for i, blob in enumerate(whole.weights.blobs):
        part = raw[blob.raw_offset : blob.raw_offset + blob.nbytes]
        assert (hashlib.sha256(part).hexdigest() == blob.sha256) == (i in own)  # det's own layer: zeros
    assert not own >= {t.blob for t in det.weights.tensors}


def test_a_failed_read_leaves_nothing_held_or_claimed(pair, tmp_path) -> None:
    bundle, sources = pair
    weights = _weight_file(bundle)
    good = weights.read_bytes()
    whole, _, _ = read_bundle_manifest(bundle)
    last = whole.weights.blobs[-1].frames[-1]
    damaged = bytearray(good)
    damaged[last.offset] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    used_by = {m.name: {t.blob for t in m.tensors} for m in whole.models}
    broken = next(n for n, b in used_by.items() if len(whole.weights.blobs) - 1 in b)
    with pytest.raises(IntegrityError):
        runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model=broken)
    gc.collect()
    assert REGISTRY.held(weights) == (0, 0)
    weights.write_bytes(good)  # repaired: the same blobs are read again, not waited for
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model=broken) as s:
        np.testing.assert_array_equal(s.run(FEEDS)["y"], _ort(sources[broken], FEEDS)["y"])


def test_a_reader_that_skips_the_frame_digests_shares_nothing(pair, reads) -> None:
    bundle, _ = pair
    whole, _, _ = read_bundle_manifest(bundle)
    det, rec = whole.views()
    blob = det.weights.tensor("fc1.weight").blob
    with WeightReader(bundle, det.weights, verify_frames=False) as unchecked, WeightReader(bundle, rec.weights) as r:
        mine = shared_blobs(unchecked, [blob])[blob]
        assert REGISTRY.held(_weight_file(bundle)) == (0, 0)  # what was not hashed is never handed to a load
        theirs = shared_blobs(r, [blob])[blob]
        assert not np.shares_memory(mine, theirs) and np.array_equal(mine, theirs)
    offsets = [f.offset for f in whole.weights.blobs[blob].frames]
    assert all(_counts(reads, bundle)[o] == 2 for o in offsets)


def test_a_host_refit_takes_the_blobs_another_session_holds(pair, tmp_path, reads) -> None:
    bundle, sources = pair
    _with_stand_in_engines(bundle)
    frames = _frames(bundle)
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", model="rec") as rec:  # no GPU here: ONNX Runtime
        assert rec.backend == "onnxruntime"
        whole, _, _ = read_bundle_manifest(bundle)
        fake = RecordingFakeTrtRuntime(whole.view("det"))
        loader = Loader(probe=lambda: MACHINE, trt_runtime=lambda device: fake)
        with loader.load(bundle, "T", cache_dir=tmp_path / "c", model="det", weights_on_device=False) as det:
            assert det.backend == "tensorrt_rtx" and det.report.engine["weights_from"] == "host"
        # det's refit read only its own layer's frames: the others came from rec's session
        assert _counts(reads, bundle) == dict.fromkeys(frames["det"] | frames["rec"], 1)
        with WeightReader(bundle, whole.view("det").weights) as r:
            assert fake.set == {t.name: r.read_tensor(t.name).tobytes() for t in whole.view("det").weights.tensors}
        np.testing.assert_array_equal(rec.run(FEEDS)["y"], _ort(sources["rec"], FEEDS)["y"])


def test_doctor_prints_twenty_models_in_full_and_counts_the_rest(tmp_path) -> None:
    src = models.make_mlp(tmp_path / "src")
    bundle = _build(tmp_path / "bundle", {f"m{i:02}": src for i in range(23)})
    r = _runner().invoke(main, ["doctor", str(bundle), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0, r.stderr
    assert "23 models: m00, m01" in r.stdout and "m19 and 3 more" in r.stdout
    assert "\nmodel m19, made" in r.stdout and "\nmodel m20" not in r.stdout
    assert "and 3 more models: --model NAME shows one, --json every one" in r.stdout
    r = _runner().invoke(main, ["doctor", str(bundle), "--json", "--cache-dir", str(tmp_path / "c")])
    assert len(json.loads(r.stdout)["bundle"]["models"]) == 23
