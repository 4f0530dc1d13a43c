"""The TRT-RTX session: the load-sequence contract against a recording fake of the TRT-RTX runtime (no GPU here),
plus tests on a real supported GPU that skip with the probe's reason elsewhere."""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime_shim
from runtime_shim import Loader
from runtime_shim.cache_key import built_engine_name, cache_key_for, model_id
from runtime_shim.errors import BackendUnavailableError, IntegrityError, MachineError
from runtime_shim.fsutil import atomic_write
from runtime_shim.gpu.upload import DeviceTensor
from runtime_shim.machine import Gpu, Machine, probe, trt_rtx_supports
from runtime_shim.manifest import Engine, FileRef, RuntimeCache, read_manifest
from runtime_shim.session import _save_open_sessions
from runtime_shim.trt.runtime import decode_diagnostics
from runtime_shim.user_cache import UserCache

sys.path.insert(0, str(Path(__file__).parent))
import models

from bundler.build import build_bundle
from bundler.config import BuildOptions
from runtime_shim.manifest import Profile, ShapeRange

TRT_VERSION = probe().trt_rtx_version
RTX4090 = Gpu(index=0, name="NVIDIA GeForce RTX 4090", pci_device_id=0x2684, uuid="GPU-x", sm=89, total_memory=24 << 30)
MACHINE = Machine(
    os="linux",
    platform="linux_x86_64",
    cpu_arch="x86_64",
    python="3.11",
    trt_rtx_version=TRT_VERSION,
    cuda_flavour="cu13",
    driver_version="580.95.05",
    driver_cuda_version=13000,
    gpus=(RTX4090,),
)


class RecordingFakeTrtRuntime:
    """A FAKE of the TRT-RTX runtime (none can run here): records every call of the TrtRuntime seam, in order."""

    def __init__(
        self,
        manifest,
        *,
        validity=("VALID", 0),
        accept_cache: int | None = None,
        names=None,
        proto=None,
        reject_weight: str | None = None,
        upload_error: Exception | None = None,
    ) -> None:
        self.calls: list[tuple] = []
        self.store = manifest.weights
        self.outputs = [o.name for o in manifest.outputs]
        self.validity, self.accept_cache, self.reject_weight = validity, accept_cache, reject_weight
        self.names = names if names is not None else [t.name for t in self.store.tensors]
        self.proto = proto or {}
        self.set: dict[str, bytes] = {}
        self.caches_offered: list[bytes] = []
        self.upload_error = upload_error
        self.uploads: list[FakeDeviceUpload] = []

    def engine_validity(self, header):
        self.calls.append(("engine_validity", len(header)))
        return self.validity

    def deserialize(self, plan):
        self.calls.append(("deserialize", hashlib.sha256(plan).hexdigest()))
        return "engine"

    def refittable_weights(self, engine):
        self.calls.append(("refittable_weights",))
        return list(self.names)

    def weight_prototype(self, engine, name):
        self.calls.append(("weight_prototype", name))
        if name in self.proto:
            return self.proto[name]
        try:
            t = self.store.tensor(name)
        except KeyError:
            return "float32", -1  # what TRT-RTX's prototype says for a name it does not know
        return t.dtype, int(np.prod(t.shape, dtype=np.int64))

    def set_weights(self, engine, name, dtype, count, array):
        self.calls.append(("set_weights", name, "host"))
        self.set[name] = bytes(array.tobytes())
        return name != self.reject_weight

    def set_device_weights(self, engine, name, dtype, count, ptr):
        self.calls.append(("set_weights", name, "device", ptr))
        live = [u for u in self.uploads if not u.freed and ptr in u.memory]
        assert live, f"{name}: pointer 0x{ptr:x} is not from a live upload"  # freed early, or made up
        self.set[name] = live[0].memory[ptr].tobytes()
        return name != self.reject_weight

    def open_uploader(self, *, slot_bytes, threads):
        self.calls.append(("open_uploader", slot_bytes, threads))
        return FakeUploader(self)

    def refit(self, engine):
        self.calls.append(("refit",))
        return True

    def create_context(self, engine, *, specialization, cuda_graphs, caches):
        self.calls.append(("create_context", specialization, cuda_graphs, len(caches)))
        self.caches_offered = list(caches)
        return "context", self.accept_cache if self.accept_cache is not None and self.accept_cache < len(
            caches
        ) else None

    def execute(self, context, inputs, profile):
        self.calls.append(("execute", profile, tuple(sorted((k, v.shape) for k, v in inputs.items()))))
        first = next(iter(inputs.values()))
        return {n: first.copy() for n in self.outputs}

    def serialize_cache(self, context):
        self.calls.append(("serialize_cache",))
        return b"serialized kernels"

    def release(self, context, engine):
        self.calls.append(("release",))

    def names_called(self) -> list[str]:
        return [c[0] for c in self.calls]


class FakeUploader:
    """A FAKE of gpu_upload.Uploader: decodes the blobs into host buffers whose addresses stand in for device pointers."""

    decoded_on, decode_why = "host", "the fake decodes on the host"  # what gpu_upload.Uploader reports after an upload

    def __init__(self, runtime: RecordingFakeTrtRuntime) -> None:
        self.runtime = runtime

    def upload(self, reader, indices=None):
        indices = list(range(len(reader.store.blobs)) if indices is None else indices)
        self.runtime.calls.append(("upload", tuple(indices)))
        if self.runtime.upload_error is not None:
            raise self.runtime.upload_error
        up = FakeDeviceUpload(self.runtime)
        where = {}
        for i in indices:
            buf = np.empty(max(reader.store.blobs[i].nbytes, 1), np.uint8)
            reader.decode_blob_into(i, memoryview(buf)[: reader.store.blobs[i].nbytes])
            where[i] = buf.ctypes.data
            up.memory[buf.ctypes.data] = buf[: reader.store.blobs[i].nbytes]
        for t in reader.store.tensors:
            if t.blob in where:
                up.tensors[t.name] = DeviceTensor(
                    t.name, t.dtype, tuple(t.shape), where[t.blob], reader.store.blobs[t.blob].nbytes
                )
        self.runtime.uploads.append(up)
        return up

    def close(self):
        self.runtime.calls.append(("close_uploader",))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FakeDeviceUpload:
    """What FakeUploader.upload returns (gpu_upload.DeviceWeights' shape); free() is recorded."""

    def __init__(self, runtime: RecordingFakeTrtRuntime) -> None:
        self.runtime, self.tensors, self.memory, self.freed = runtime, {}, {}, False

    def free(self):
        assert not self.freed, "freed twice"
        self.freed = True
        self.runtime.calls.append(("free_upload",))


@pytest.fixture
def mlp(tmp_path):
    """A real bundle of the MLP test model, plus a weightless engine entry for SM 8.9 and two bundled caches."""
    return _bundle_with_stand_ins(tmp_path, "mlp")


def _bundle_with_stand_ins(tmp_path, model: str):
    name, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == model)
    onnx_path = factory(tmp_path)
    bundle = tmp_path / "bundle"
    build_bundle(onnx_path, bundle, options=BuildOptions(profiles=models.as_profiles(prof), weightless=False))
    m, _ = read_manifest(bundle)
    plan = (bundle / m.engines[0].file.path).read_bytes() + b"weightless stand-in"
    ref = FileRef.for_content("engines", hashlib.sha256(plan).hexdigest(), len(plan))
    atomic_write(bundle / ref.path, plan)
    wl = Engine(
        kind="weightless", platform="linux_x86_64", compute_capabilities=(89,), trt_rtx_version=TRT_VERSION, file=ref
    )
    caches = []
    (bundle / "caches").mkdir(exist_ok=True)
    for i, key in enumerate(
        [cache_key_for(MACHINE, RTX4090), dataclasses.replace(cache_key_for(MACHINE, RTX4090), driver_version="580.65")]
    ):
        blob = f"bundled cache {i}".encode()
        cref = FileRef.for_content("caches", hashlib.sha256(blob).hexdigest(), len(blob))
        atomic_write(bundle / cref.path, blob)
        caches.append(RuntimeCache(key=key, engines=(wl.file.sha256,), file=cref))
    m = dataclasses.replace(m, engines=m.engines + (wl,), runtime_caches=tuple(caches))
    atomic_write(bundle / "manifest.json", m.to_json())
    feeds = models.sample_inputs(name, prof, onnx_path)
    return bundle, m, feeds


def _load(bundle, fake, tmp_path, **kw):
    # The probe says "an RTX 4090 is here"; every TRT-RTX runtime opened (one per engine tried) is the fake.
    return Loader(probe=lambda: MACHINE, trt_runtime=lambda device: fake).load(
        bundle, "T", cache_dir=tmp_path / "cache", **kw
    )


@pytest.mark.parametrize("on_device", [None, False])
def test_load_sequence_contract(mlp, tmp_path, on_device) -> None:
    bundle, m, feeds = mlp
    fake = RecordingFakeTrtRuntime(m, accept_cache=0)
    with _load(bundle, fake, tmp_path, specialization="eager", cuda_graphs=True, weights_on_device=on_device) as s:
        assert s.backend == "tensorrt_rtx" and s.engine.kind == "weightless"
        s.run(feeds)
        s.run(feeds)
        assert s.serialize_cache() == b"serialized kernels"
        assert (
            s.report.engine["kind"] == "weightless"
            and "bundled runtime_caches[0] (exact key)" == s.report.runtime_cache
        )
        assert (
            s.report.engine["weights_from"] == ("host" if on_device is False else "device") and s.report.warnings == []
        )
        assert s.report.engine.get("weights_decoded_on") == (
            None if on_device is False else "host (the fake decodes on the host)"
        )
    names = fake.names_called()
    n = len(m.weights.tensors)
    assert names[:3] == ["engine_validity", "deserialize", "refittable_weights"]
    # every name checked against its prototype before anything is uploaded or set
    assert names[3 : 3 + n] == ["weight_prototype"] * n
    upload = [] if on_device is False else ["open_uploader", "upload", "close_uploader"]
    freed = [] if on_device is False else ["free_upload"]
    assert names[3 + n :] == upload + ["set_weights"] * n + ["refit"] + freed + [
        "create_context",
        "execute",
        "execute",
        "serialize_cache",
        "serialize_cache",
        "release",
    ]
    sets = [c for c in fake.calls if c[0] == "set_weights"]
    assert all(c[2] == ("host" if on_device is False else "device") for c in sets)
    assert fake.calls[0] == ("engine_validity", 64)
    assert fake.calls[1][1] == m.engines[1].file.sha256  # the weightless engine, as pinned
    assert ("create_context", "eager", True, 2) in fake.calls
    assert fake.caches_offered == [b"bundled cache 0", b"bundled cache 1"]  # exact key first, then the compatible one
    # every weight set by us, with the weight store's bytes
    with __import__("runtime_shim.store.reader", fromlist=["WeightReader"]).WeightReader(bundle, m.weights) as r:
        assert fake.set == {t.name: r.read_tensor(t.name).tobytes() for t in m.weights.tensors}
    # cache saved on close, under this machine's key
    saved = UserCache("T", tmp_path / "cache").read_runtime_cache(model_id(m), cache_key_for(MACHINE, RTX4090))
    assert saved == b"serialized kernels"


def test_device_refit_uploads_each_blob_once_and_identical_tensors_share_a_pointer(tmp_path) -> None:
    bundle, m, feeds = _bundle_with_stand_ins(tmp_path, "duplicates")
    asked = ["layer2.weight", "layer1.weight", "layer2.bias", "layer1.bias"]  # the engine need not ask for every tensor
    fake = RecordingFakeTrtRuntime(m, names=asked)
    with _load(bundle, fake, tmp_path) as s:
        assert s.report.engine["weights_from"] == "device"
    blobs = sorted({m.weights.tensor(n).blob for n in asked})
    assert len(blobs) == 2 and ("upload", tuple(blobs)) in fake.calls  # two distinct blobs, head.weight's not uploaded
    ptr = {c[1]: c[3] for c in fake.calls if c[0] == "set_weights"}
    assert list(ptr) == asked
    assert (
        ptr["layer1.weight"] == ptr["layer2.weight"]
        and ptr["layer1.bias"] == ptr["layer2.bias"] != ptr["layer1.weight"]
    )
    with __import__("runtime_shim.store.reader", fromlist=["WeightReader"]).WeightReader(bundle, m.weights) as r:
        assert fake.set == {n: r.read_tensor(n).tobytes() for n in asked}
    # slots hold one frame at least and no more than the whole upload: a tiny model pins little memory
    ((_, slot_bytes, threads),) = [c for c in fake.calls if c[0] == "open_uploader"]
    largest = max(f.raw_size for i in blobs for f in m.weights.blobs[i].frames)
    assert largest <= slot_bytes <= sum(m.weights.blobs[i].nbytes for i in blobs) and threads >= 1


def test_a_rejected_device_weight_frees_the_upload_and_moves_on(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    fake = RecordingFakeTrtRuntime(m, reject_weight=m.weights.tensors[1].name)
    with _load(bundle, fake, tmp_path) as s:
        assert s.engine.kind == "weightful" and "rejected weight" in " ".join(s.report.warnings)
    names = fake.names_called()
    assert names.count("upload") == 1 and names.count("free_upload") == 1 and "refit" not in names
    assert names.index("free_upload") < names.index("release")  # freed before the next engine is tried
    assert [u.freed for u in fake.uploads] == [True]


def test_a_failed_upload_refits_from_host_memory_by_default_and_says_why(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    oom = MachineError("cudaMalloc(1234) failed: cudaErrorMemoryAllocation (out of memory)")
    fake = RecordingFakeTrtRuntime(m, upload_error=oom)
    with _load(bundle, fake, tmp_path) as s:
        assert s.engine.kind == "weightless" and s.report.engine["weights_from"] == "host"
        assert any("refit from host memory" in w and "out of memory" in w for w in s.report.warnings)
    assert {c[2] for c in fake.calls if c[0] == "set_weights"} == {"host"} and "refit" in fake.names_called()
    # asked for the GPU path explicitly: no quiet host refit, the engine is given up with the reason
    fake = RecordingFakeTrtRuntime(m, upload_error=oom)
    with _load(bundle, fake, tmp_path, weights_on_device=True) as s:
        assert s.engine.kind == "weightful" and any("out of memory" in w for w in s.report.warnings)
    assert "set_weights" not in fake.names_called()


def test_a_mismatch_is_found_before_anything_is_uploaded(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    fake = RecordingFakeTrtRuntime(m, proto={m.weights.tensors[-1].name: ("float16", 1)})
    with pytest.raises(IntegrityError, match="expects float16 x 1"):
        _load(bundle, fake, tmp_path)
    assert "open_uploader" not in fake.names_called() and "set_weights" not in fake.names_called()


def test_the_users_own_cache_is_offered_first_next_time(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    with _load(bundle, RecordingFakeTrtRuntime(m), tmp_path):
        pass
    fake = RecordingFakeTrtRuntime(m, accept_cache=0)
    with _load(bundle, fake, tmp_path) as s:
        assert fake.caches_offered[0] == b"serialized kernels" and s.report.runtime_cache.startswith("user cache ")


def test_rejected_caches_are_logged_not_fatal(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    with _load(bundle, RecordingFakeTrtRuntime(m, accept_cache=None), tmp_path) as s:
        assert s.backend == "tensorrt_rtx" and "rejected all 2" in s.report.runtime_cache


def test_weightful_engine_is_not_refit(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    m2 = dataclasses.replace(m, engines=m.engines[:1], runtime_caches=())
    atomic_write(bundle / "manifest.json", m2.to_json())
    fake = RecordingFakeTrtRuntime(m2)
    with _load(bundle, fake, tmp_path) as s:
        assert s.engine.kind == "weightful"
    assert "set_weights" not in fake.names_called() and "refit" not in fake.names_called()


def test_unsupported_gpu_validity_falls_back_and_says_why(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    fake = RecordingFakeTrtRuntime(m, validity=("INVALID", 2))
    with _load(bundle, fake, tmp_path) as s:
        assert s.backend == "onnxruntime"
        assert "UNSUPPORTED_CC" in s.report.why_not_trt and "compute capability" in s.report.why_not_trt
    with pytest.raises(BackendUnavailableError, match="UNSUPPORTED_CC"):
        _load(bundle, RecordingFakeTrtRuntime(m, validity=("INVALID", 2)), tmp_path, fallback="error")


def test_diagnostics_are_decoded_into_words() -> None:
    words = decode_diagnostics(1 | 4 | 32 | 256)
    assert words[0].startswith("VERSION_MISMATCH") and "driver is too old" in words[1] and "malformed" in words[2]
    assert "unknown diagnostics bits 0x100" in words[3]


@pytest.mark.parametrize("what", ["engine", "cache"])
def test_tampered_engine_or_cache_is_refused_before_trt_rtx_sees_it(mlp, tmp_path, what) -> None:
    bundle, m, feeds = mlp
    ref = m.engines[1].file if what == "engine" else m.runtime_caches[0].file
    data = bytearray((bundle / ref.path).read_bytes())
    data[len(data) // 2] ^= 1
    (bundle / ref.path).write_bytes(bytes(data))
    fake = RecordingFakeTrtRuntime(m)
    with pytest.raises(IntegrityError, match=f"{ref.path}: .*pins sha256 {ref.sha256}"):
        _load(bundle, fake, tmp_path)
    assert "create_context" not in fake.names_called()


@pytest.mark.parametrize(
    "kw, error",
    [
        ({"names": ["not-in-the-store"]}, "asks for weight 'not-in-the-store', which the bundle's weight store lacks"),
        ({"proto": {"w1": ("float16", 1)}}, "the engine expects float16 x 1"),
    ],
)
def test_refit_mismatches_are_integrity_errors(mlp, tmp_path, kw, error) -> None:
    bundle, m, feeds = mlp
    kw = {k: ({m.weights.tensors[0].name: v["w1"]} if k == "proto" else v) for k, v in kw.items()}
    with pytest.raises(IntegrityError, match=error.replace("(", r"\(").replace(")", r"\)")):
        _load(bundle, RecordingFakeTrtRuntime(m, **kw), tmp_path)


def test_a_rejected_weight_moves_on_to_the_next_engine(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    fake = RecordingFakeTrtRuntime(m, reject_weight=m.weights.tensors[0].name)
    with _load(bundle, fake, tmp_path) as s:  # weightless refused -> weightful (same fake: no refit needed)
        assert s.backend == "tensorrt_rtx" and s.engine.kind == "weightful" and s.report.engine["kind"] == "weightful"
    assert fake.names_called().count("deserialize") == 2


def test_open_sessions_save_their_cache_at_exit(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    s = _load(bundle, RecordingFakeTrtRuntime(m), tmp_path)
    _save_open_sessions()  # what atexit runs
    assert (
        UserCache("T", tmp_path / "cache").read_runtime_cache(model_id(m), cache_key_for(MACHINE, RTX4090))
        == b"serialized kernels"
    )
    s.close()


# ----------------------------------------------------------------------------------------- real GPU only
_HERE = probe()
_SUPPORTED = [g for g in _HERE.gpus if trt_rtx_supports(g.sm)]
_WHY = _HERE.problem or (
    "no GPU TensorRT for RTX supports: " + "; ".join(f"{g.name} is SM {g.sm_text}" for g in _HERE.gpus)
)
needs_rtx = pytest.mark.skipif(not _SUPPORTED, reason=f"needs a GPU that TRT-RTX supports ({_WHY})")


@pytest.mark.rtx_gpu
@needs_rtx
@pytest.mark.parametrize("weightless", [False, True])
def test_real_gpu_matches_onnxruntime(tmp_path, weightless) -> None:
    import onnxruntime as ort

    name, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == "mlp")
    onnx_path = factory(tmp_path)
    bundle = tmp_path / "b"
    build_bundle(
        onnx_path,
        bundle,
        options=BuildOptions(profiles=models.as_profiles(prof), weightful=not weightless, weightless=weightless),
    )
    feeds = models.sample_inputs(name, prof, onnx_path)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c", fallback="error") as s:
        for _ in range(3):  # 2nd run captures the CUDA graph, 3rd replays it
            out = list(s.run(feeds).values())
        assert s.backend == "tensorrt_rtx"
        for a, b in zip(out, ref):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
        assert s.serialize_cache()


def test_the_profile_that_holds_the_shapes_is_used(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    wide = Profile(shapes={"x": ShapeRange(min=(17, 64), opt=(24, 64), max=(32, 64))})
    atomic_write(bundle / "manifest.json", dataclasses.replace(m, profiles=m.profiles + (wide,)).to_json())
    fake = RecordingFakeTrtRuntime(m)
    big = {"x": np.zeros((20, 64), np.float32)}
    with _load(bundle, fake, tmp_path) as s:
        s.run(feeds)
        s.run(big)
        s.run(big, profile=1)
        with pytest.raises(runtime_shim.errors.InputError, match="outside the bundle's shape profile 0"):
            s.run(big, profile=0)
        with pytest.raises(runtime_shim.errors.InputError, match="2 optimization profile"):
            s.run(big, profile=2)
    assert [c[1] for c in fake.calls if c[0] == "execute"] == [0, 1, 1]


def test_build_here_uses_the_engine_kept_in_the_user_cache(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    atomic_write(bundle / "manifest.json", dataclasses.replace(m, engines=(), runtime_caches=()).to_json())
    cache = UserCache("T", tmp_path / "cache")
    cache.save_engine(built_engine_name(m, 89, TRT_VERSION), b"engine built here earlier")
    fake = RecordingFakeTrtRuntime(m)
    with _load(bundle, fake, tmp_path) as s:
        assert s.backend == "tensorrt_rtx" and s.report.engine["kind"] == "built_here" and s.engine is None
    assert fake.calls[1] == ("deserialize", hashlib.sha256(b"engine built here earlier").hexdigest())
    assert "refit" in fake.names_called()  # built weightless: refit from the weight store


@pytest.mark.skipif(
    any(trt_rtx_supports(g.sm) for g in probe().gpus), reason="a supported GPU is present: the build would succeed"
)
def test_build_here_failing_falls_back_with_the_reason(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    atomic_write(bundle / "manifest.json", dataclasses.replace(m, engines=(), runtime_caches=()).to_json())
    # No GPU here: the real weightless build fails, and the report says so.
    with _load(bundle, RecordingFakeTrtRuntime(m), tmp_path) as s:
        assert s.backend == "onnxruntime" and "building an engine for this GPU failed" in s.report.why_not_trt
        s.run(feeds)


def test_weights_are_hashed_on_every_load_and_a_change_is_caught(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    for verify in ("always", "once", "always"):  # "once" is kept as a name only: every load hashes every frame
        with _load(bundle, RecordingFakeTrtRuntime(m), tmp_path, verify_weights=verify) as s:
            assert s.report.engine["weights_check"] == "every frame's blake3 checked as it was read"
    # Damage one stored byte, same size, and put the modification time back: every frame is hashed, the damage caught.
    path = bundle / m.weights.file.path
    before = path.stat()
    frame = m.weights.blobs[-1].frames[-1]
    data = bytearray(path.read_bytes())
    data[frame.offset + frame.size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    import os

    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(IntegrityError, match=r"frame \d+ .*blake3"):
        _load(bundle, RecordingFakeTrtRuntime(m), tmp_path)


def test_verify_weights_takes_once_or_always(mlp, tmp_path) -> None:
    bundle, m, feeds = mlp
    with pytest.raises(
        runtime_shim.errors.BundleError, match="verify_weights: expected 'once' or 'always', got 'never'"
    ):
        _load(bundle, RecordingFakeTrtRuntime(m), tmp_path, verify_weights="never")
