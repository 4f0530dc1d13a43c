"""runtime_shim.gpu.upload on a real CUDA GPU (any GPU: TRT-RTX support is not needed): every tensor of real bundles
goes through the pinned ring to device memory and comes back bit-exact; pinned memory stays within the ring. These skip,
with the reason, where cuda-python finds no device. On every machine: the no-device error, and the ring's host path
run against a FAKE of the CUDA runtime (host memory standing in for device memory), with and without a Stats.

    python3 -m pytest -q tests/test_gpu_upload.py
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest

from bundler.onnx_model import load_model
from bundler.store_writer import Weight, write_weight_store
from runtime_shim.errors import IntegrityError, MachineError
from runtime_shim.gpu import nvcomp, packing
from runtime_shim.gpu import stats as gpu_stats
from runtime_shim.gpu import upload as gpu_upload
from runtime_shim.gpu.cuda import check
from runtime_shim.gpu.cuda import cudart as real_cudart
from runtime_shim.gpu.stats import Stats
from runtime_shim.gpu.upload import Uploader, upload_weights
from runtime_shim.store.reader import WeightReader

sys.path.insert(0, str(Path(__file__).parent))
import models


def _no_device_reason() -> str | None:
    """Why no CUDA device can be used here (None: one can)."""
    try:
        rt = real_cudart()
        count = check(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except MachineError as e:
        return f"cuda-python finds no CUDA device: {e}"
    return None if count else "cuda-python finds no CUDA device (count 0)"


def _cuda_python_missing() -> bool:
    try:
        real_cudart()
    except MachineError:
        return True
    return False


NO_DEVICE = _no_device_reason()
needs_cuda = pytest.mark.skipif(NO_DEVICE is not None, reason=f"needs a CUDA GPU, any model ({NO_DEVICE})")
NO_NVCOMP = nvcomp.available()
# Both ways of decoding: on host threads into the pinned ring, and on the GPU (nvCOMP + the plane kernel).
DECODES = [
    "host",
    pytest.param(
        "device", marks=pytest.mark.skipif(NO_NVCOMP is not None, reason=f"GPU decoding needs nvCOMP ({NO_NVCOMP})")
    ),
]


# ------------------------------------------------------------------------------------------- every machine
@pytest.mark.skipif(_cuda_python_missing(), reason="cuda-python is not importable (tested below)")
def test_without_a_cuda_device_the_uploader_raises_a_readable_machine_error() -> None:
    rt = real_cudart()
    err, count = rt.cudaGetDeviceCount()
    device = count if int(err) == 0 else 0  # a device index that does not exist on this machine
    with pytest.raises(MachineError) as e:
        Uploader(device=device)
    message = str(e.value)
    assert message.startswith(
        f"cannot upload weights to CUDA device {device}: cudaSetDevice({device}) failed: cudaError"
    )
    assert "nvidia-smi" in e.value.hint


def test_without_cuda_python_the_uploader_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "cuda", None)
    with pytest.raises(MachineError, match="cuda-python is not importable") as e:
        Uploader()
    assert "pip install" in e.value.hint


# ------------------------------------------------------------------------------------------- real GPU
class _CountingCudart:
    """The real cuda.bindings.runtime, counting pinned and device memory still held, and the peak of pinned."""

    def __init__(self, rt) -> None:
        self._rt = rt
        self.pinned: dict[int, int] = {}
        self.device: dict[int, int] = {}
        self.peak_pinned = 0

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def cudaMallocHost(self, size):
        result = self._rt.cudaMallocHost(size)
        if int(result[0]) == 0:
            self.pinned[int(result[1])] = size
            self.peak_pinned = max(self.peak_pinned, sum(self.pinned.values()))
        return result

    def cudaFreeHost(self, ptr):
        self.pinned.pop(int(ptr), None)
        return self._rt.cudaFreeHost(ptr)

    def cudaMalloc(self, size):
        result = self._rt.cudaMalloc(size)
        if int(result[0]) == 0:
            self.device[int(result[1])] = size
        return result

    def cudaFree(self, ptr):
        self.device.pop(int(ptr), None)
        return self._rt.cudaFree(ptr)


@pytest.fixture
def cudart(monkeypatch) -> _CountingCudart:
    counting = _CountingCudart(real_cudart())
    monkeypatch.setattr(gpu_upload, "cudart", lambda: counting)
    return counting


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """(directory, WeightStore) per test model: its bundle as built, and its weights rewritten in 1 KiB frames
    (multi-frame blobs) under the same name + ':small-frames'."""
    if NO_DEVICE is not None:
        pytest.skip(f"needs a CUDA GPU, any model ({NO_DEVICE})")
    root = tmp_path_factory.mktemp("gpu_upload")
    out = {}
    for name, factory, _ in models.ALL_BUNDLABLE:
        # The weight store as build writes it (no engine and no TRT-RTX needed: uploads do not use one), and the same
        # tensors again in 1 KiB frames (multi-frame blobs) under the name + ':small-frames'.
        weights = list(load_model(factory(root / "models")).weights)
        for suffix, chunk in (("", None), (":small-frames", 1024)):
            d = root / f"{name}{suffix.replace(':', '-')}"
            out[name + suffix] = (
                d,
                write_weight_store(weights, d, threads=2, **({"chunk_bytes": chunk} if chunk else {})),
            )
    return out


def _device_bytes(rt, ptr: int, nbytes: int) -> bytes:
    back = (ctypes.c_ubyte * max(nbytes, 1))()
    if nbytes:
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt, rt.cudaMemcpy(ctypes.addressof(back), ptr, nbytes, d2h), "cudaMemcpy D2H")
    return bytes(back)[:nbytes]


def _check_every_tensor(rt, reader: WeightReader, dw) -> None:
    assert set(dw.tensors) == {t.name for t in reader.store.tensors}
    for t in reader.store.tensors:
        d = dw.tensors[t.name]
        assert d.ptr % packing.DEVICE_ALIGNMENT == 0 and dw.base <= d.ptr and d.ptr + d.nbytes <= dw.base + dw.nbytes
        assert _device_bytes(rt, d.ptr, d.nbytes) == reader.read_tensor(t.name).tobytes(), (
            f"{t.name} differs on the device"
        )


# (threads, slots, slot size in frames of the largest frame): one slot, two-slot ring, more slots than threads
RINGS = [(1, 2, 1), (4, None, 1), (2, 3, 2), (8, 2, 3)]


@needs_cuda
@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("threads, slots, frames_a_slot", RINGS)
@pytest.mark.parametrize(
    "model", [n for n, _, _ in models.ALL_BUNDLABLE] + [f"{n}:small-frames" for n, _, _ in models.ALL_BUNDLABLE]
)
def test_every_tensor_round_trips_bit_exact_within_the_pinned_ring(
    stores, cudart, model, threads, slots, frames_a_slot, decode
) -> None:
    bundle_dir, store = stores[model]
    slot_bytes = max(max(f.raw_size, f.size) for b in store.blobs for f in b.frames) * frames_a_slot
    raw = sum(b.nbytes for b in store.blobs)
    with WeightReader(bundle_dir, store, threads=threads) as reader:
        order = list(range(len(store.blobs)))
        segments = packing.host_segments(reader, order, packing.device_layout(reader, order)[0], slot_bytes)
        if raw > slot_bytes:
            assert len(segments) > 1  # one segment would hold every frame: the slot is smaller, so several copies
        # batch_bytes: small enough that the bigger stores take several GPU batches (both halves, reused)
        with Uploader(
            threads=threads, slots=slots, slot_bytes=slot_bytes, decode=decode, batch_bytes=max(slot_bytes, 1 << 16)
        ) as up:
            ring = up.slots * up.slot_bytes
            for _ in range(2):  # the second upload reuses the slots and their events
                dw = up.upload(reader)
                compressed = any(b.encoding != "none" for b in store.blobs)
                assert up.decoded_on == ("gpu" if decode == "device" and compressed else "host")
                try:
                    _check_every_tensor(cudart, reader, dw)
                finally:
                    dw.free()
                assert dw.base == 0
    # plus, on the GPU path, the pinned tables: nvCOMP's pointers, sizes and statuses (48 bytes a zstd chunk) and the
    # kernel's jobs (96 bytes a frame): a bound by the frame count, a hundred thousandth of the model's bytes
    t = packing.frame_table(reader, order, packing.device_layout(reader, order)[0])
    decoder_arrays = 48 * max(64, int(t["chunks"].sum())) + 96 * max(64, len(t["size"]))
    assert (
        0 < cudart.peak_pinned <= ring + (decoder_arrays if decode == "device" else 0)
    )  # bounded by the ring, whatever the model's size
    assert cudart.pinned == {} and cudart.device == {}  # close() and free() gave everything back
    if model.endswith(":small-frames"):
        assert sum(len(b.frames) for b in store.blobs) > len(store.blobs)  # multi-frame blobs really were exercised


@needs_cuda
def test_upload_weights_one_shot_and_identical_tensors_share_device_memory(stores, cudart) -> None:
    bundle_dir, store = stores["duplicates"]
    with WeightReader(bundle_dir, store) as reader, upload_weights(reader, threads=2) as dw:
        _check_every_tensor(cudart, reader, dw)
        assert dw.tensors["layer1.weight"].ptr == dw.tensors["layer2.weight"].ptr
        assert dw.tensors["layer1.bias"].ptr == dw.tensors["layer2.bias"].ptr
        assert len({d.ptr for d in dw.tensors.values()}) == len(store.blobs)
    assert cudart.pinned == {} and cudart.device == {}


@needs_cuda
def test_a_subset_of_blobs_uploads_only_those(stores, cudart) -> None:
    bundle_dir, store = stores["mlp:small-frames"]
    wanted = [len(store.blobs) - 1, 0]
    with (
        WeightReader(bundle_dir, store) as reader,
        Uploader(threads=2, slot_bytes=1024) as up,
        up.upload(reader, wanted) as dw,
    ):
        names = {t.name for t in store.tensors if t.blob in wanted}
        assert set(dw.tensors) == names and dw.nbytes < sum(b.nbytes for b in store.blobs)
        for name in names:
            assert (
                _device_bytes(cudart, dw.tensors[name].ptr, dw.tensors[name].nbytes)
                == reader.read_tensor(name).tobytes()
            )


@needs_cuda
def test_a_frame_bigger_than_a_slot_is_refused_before_any_gpu_memory_is_taken(stores, cudart) -> None:
    bundle_dir, store = stores["mlp"]
    largest = max(f.raw_size for b in store.blobs for f in b.frames)
    with WeightReader(bundle_dir, store) as reader, Uploader(threads=1, slot_bytes=largest - 1) as up:
        with pytest.raises(ValueError, match=f"a frame of {largest} bytes does not fit"):
            up.upload(reader)
        assert cudart.device == {}


@needs_cuda
@pytest.mark.parametrize("decode", DECODES)
def test_a_corrupt_frame_fails_the_upload_and_frees_its_device_memory(stores, cudart, tmp_path, decode) -> None:
    src_dir, store = stores["conv:small-frames"]
    (tmp_path / "weights").mkdir()
    data = bytearray((src_dir / store.file.path).read_bytes())
    frame = store.blobs[-1].frames[-1]
    data[frame.offset + frame.size // 2] ^= 0x40
    (tmp_path / store.file.path).write_bytes(bytes(data))
    with WeightReader(tmp_path, store, threads=2) as reader, Uploader(threads=2, slot_bytes=1024, decode=decode) as up:
        with pytest.raises(
            IntegrityError, match=r"frame \d+ .*(blake3|sha256) [0-9a-f]{64}, expected"
        ):  # caught on the host: nvCOMP never sees it
            up.upload(reader)
        kept = set(up.device_decoder.held) if up.device_decoder is not None else set()
        assert set(cudart.device) == kept  # the upload's own allocation was given back (the decoder's stay for reuse)
    assert cudart.pinned == {}


@needs_cuda
@pytest.mark.parametrize("decode", DECODES)
def test_an_unverified_frame_with_a_bad_plane_header_is_refused_before_decoding(
    stores, cudart, tmp_path, decode
) -> None:
    """verify_frames=False (a file verified before): a damaged plane header still fails cleanly, on the host, before
    any decoder (nvCOMP's is undefined on bad input) sees it."""
    src_dir, store = stores["mlp"]
    i = next(k for k, b in enumerate(store.blobs) if b.encoding == "zstd-byteplane")
    frame = store.blobs[i].frames[0]
    data = bytearray((src_dir / store.file.path).read_bytes())
    assert data[frame.offset : frame.offset + 4] == b"BP2\x00"
    data[frame.offset + 4] = 7  # plane 0's mode
    (tmp_path / "weights").mkdir()
    (tmp_path / store.file.path).write_bytes(bytes(data))
    with (
        WeightReader(tmp_path, store, threads=2, verify_frames=False) as reader,
        Uploader(threads=2, decode=decode) as up,
    ):
        with pytest.raises(
            IntegrityError, match=rf"blob {i} .*frame 0 .*cannot decode as zstd-byteplane .*unknown mode 7"
        ):
            up.upload(reader)


@needs_cuda
def test_without_nvcomp_auto_decodes_on_the_host_and_says_why_and_device_refuses(stores, cudart, monkeypatch) -> None:
    monkeypatch.setattr(nvcomp, "find_nvcomp", lambda: None)
    monkeypatch.delenv("TRTX_NVCOMP_LIBRARY", raising=False)
    bundle_dir, store = stores["mlp"]
    with WeightReader(bundle_dir, store) as reader:
        with Uploader(threads=2, decode="auto") as up, up.upload(reader) as dw:
            assert up.decoded_on == "host" and up.decode_why == "nvCOMP is not installed"
            _check_every_tensor(cudart, reader, dw)
        with Uploader(threads=2, decode="device") as up:
            with pytest.raises(MachineError, match="cannot decode weights on the GPU: nvCOMP is not installed") as e:
                up.upload(reader)
            assert "nvidia-libnvcomp" in e.value.hint
            assert cudart.device == {}  # refused before the upload's allocation


def test_uploader_arguments_are_checked_before_any_gpu_work() -> None:
    with pytest.raises(ValueError, match="decode='gpu': expected 'auto', 'device' or 'host'"):
        Uploader(decode="gpu")


@needs_cuda
@pytest.mark.parametrize("decode", DECODES)
def test_a_store_that_expands_a_thousandfold_uploads_within_the_gpu_batches(cudart, tmp_path, decode) -> None:
    """64 MiB of zeros stores in a few kB: segments are cut by raw bytes too, or one would not fit a batch."""
    import numpy as np

    rng = np.random.default_rng(3)
    weights = [
        Weight("mask", "float32", (16 << 20,), np.zeros(16 << 20, dtype=np.float32).tobytes()),
        Weight("w", "float32", (1 << 20,), (rng.standard_normal(1 << 20) * 0.02).astype(np.float32).tobytes()),
    ]
    store = write_weight_store(weights, tmp_path, threads=2)
    assert store.file.size < 8 << 20
    with WeightReader(tmp_path, store) as reader, Uploader(threads=2, decode=decode) as up, up.upload(reader) as dw:
        _check_every_tensor(cudart, reader, dw)


# ------------------------------------------------------------------------------------------- every machine, FAKE CUDA
class _FakeCudartOnHost:
    """A FAKE of cuda.bindings.runtime for the uploader's host path: "device" and pinned memory are ctypes buffers,
    copies are memmoves done at once, streams and events are numbers. It stands in for the GPU this machine lacks."""

    cudaStreamNonBlocking = cudaEventDisableTiming = 1

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1

    def __init__(self) -> None:
        self.buffers: dict[int, ctypes.Array] = {}  # live allocations, pinned and "device" alike
        self.copies = 0

    def _alloc(self, n: int) -> tuple[int, int]:
        buf = (ctypes.c_ubyte * max(n, 1))()
        self.buffers[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    cudaMalloc = cudaMallocHost = _alloc

    def _free(self, ptr: int) -> tuple[int]:
        del self.buffers[int(ptr)]
        return (0,)

    cudaFree = cudaFreeHost = _free

    def cudaMemcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> tuple[int]:
        ctypes.memmove(dst, src, n)
        self.copies += 1
        return (0,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[int, int]:
        return 0, 7

    def cudaEventCreateWithFlags(self, flags: int) -> tuple[int, int]:
        return 0, 9

    def __getattr__(self, name: str):  # cudaSetDevice, cudaEventRecord, cudaStreamSynchronize, ...: nothing to do
        return lambda *args: (0,)


def _counting_clock(monkeypatch) -> list[int]:
    """Count the clock reads of runtime_shim.gpu.stats (the only clock the upload path has)."""
    reads = [0]
    real = gpu_stats.time.perf_counter

    class _Time:
        @staticmethod
        def perf_counter() -> float:
            reads[0] += 1
            return real()

    monkeypatch.setattr(gpu_stats, "time", _Time)
    return reads


@pytest.mark.parametrize("encoding", ["zstd-byteplane", "none"])
def test_the_ring_host_path_on_a_fake_cuda_runtime_round_trips_and_times_only_with_a_stats(
    monkeypatch, tmp_path, encoding
) -> None:
    import numpy as np

    fake = _FakeCudartOnHost()
    monkeypatch.setattr(gpu_upload, "cudart", lambda: fake)
    reads = _counting_clock(monkeypatch)
    rng = np.random.default_rng(5)
    weights = [
        Weight(f"w{k}", "float32", (n,), (rng.standard_normal(n) * 0.02).astype(np.float32).tobytes())
        for k, n in enumerate((3000, 17, 1024, 5000))
    ]
    store = write_weight_store(weights, tmp_path, encoding=encoding, chunk_bytes=4096, threads=2)
    slot = 2 * max(max(f.raw_size, f.size) for b in store.blobs for f in b.frames)
    with WeightReader(tmp_path, store, threads=2) as reader:
        order = list(range(len(store.blobs)))
        assert len(packing.host_segments(reader, order, packing.device_layout(reader, order)[0], slot)) > 3  # wraps
        stats = Stats()
        for timing in (None, stats):
            with Uploader(threads=2, slots=3, slot_bytes=slot, decode="host", stats=timing) as up:
                before = reads[0]
                with up.upload(reader) as dw:
                    assert up.decoded_on == "host"
                    for t in store.tensors:
                        d = dw.tensors[t.name]
                        assert ctypes.string_at(d.ptr, d.nbytes) == reader.read_tensor(t.name).tobytes(), t.name
                if timing is None:
                    assert reads[0] == before  # no Stats: the upload read no clock at all
                else:
                    assert reads[0] > before
        steps = {name for name, _ in stats.items()}
        assert steps == {
            "layout, decoder check",
            "cudaMalloc",
            "tensor table",
            "wait for threads",
            "enqueue",
            "wait for a free slot",
        }
    assert fake.buffers == {}  # close() and free() gave back every buffer
