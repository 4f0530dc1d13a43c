"""Engine and runtime-cache choice: table-driven over machines (SKUs, SMs, drivers, versions, OSes) and manifests."""

from __future__ import annotations

import hashlib

import pytest

from runtime_shim.cache_key import classify_cache
from runtime_shim.machine import Gpu, Machine
from runtime_shim.manifest import (
    Blob,
    CacheKey,
    Engine,
    FileRef,
    Frame,
    Manifest,
    ModelInfo,
    Profile,
    RuntimeCache,
    ShapeRange,
    Skeleton,
    TensorSpec,
    TrtRtx,
    WeightStore,
    WeightTensor,
)
from runtime_shim.select import assess, pick_gpu, rank_caches, rank_engines

V = "1.7.1.116"


def _sha(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()


def engine(
    kind: str, sms: tuple[int, ...], *, version: str = V, platform: str = "linux_x86_64", tag: str = ""
) -> Engine:
    return Engine(
        kind=kind,
        platform=platform,
        compute_capabilities=sms,
        trt_rtx_version=version,
        file=FileRef.for_content("engines", _sha(f"{kind}{sms}{version}{platform}{tag}"), 1000),
    )


def key(**kw) -> CacheKey:
    base = dict(
        os="linux",
        gpu_name="NVIDIA GeForce RTX 4090",
        pci_device_id=0x2684,
        sm=89,
        driver_version="580.95.05",
        cuda_flavour="cu13",
        trt_rtx_version=V,
        cig=False,
    )
    base.update(kw)
    return CacheKey(**base)


def cache(k: CacheKey, engines: tuple[Engine, ...], *, created: int | None = None, tag: str = "") -> RuntimeCache:
    return RuntimeCache(
        key=k,
        engines=tuple(e.file.sha256 for e in engines[:1]),
        created=created,
        file=FileRef.for_content("caches", _sha(f"{k}{created}{tag}"), 100),
    )


def manifest(engines: tuple[Engine, ...] = (), caches: tuple[RuntimeCache, ...] = ()) -> Manifest:
    store = WeightStore(
        file=FileRef.for_content("weights", _sha("w"), 100),
        raw_size=64,
        alignment=64,
        blobs=(
            Blob(
                sha256=_sha("b"),
                nbytes=64,
                raw_offset=0,
                encoding="none",
                element_size=1,
                frames=(Frame(offset=8, size=64, raw_size=64, digest=_sha("f")),),
            ),
        ),
        tensors=(WeightTensor(name="w", dtype="float32", shape=(4, 4), blob=0),),
    )
    return Manifest(
        model=ModelInfo(name="m"),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("batch", 4)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("batch", 4)),),
        profiles=(Profile(shapes={"x": ShapeRange(min=(1, 4), opt=(2, 4), max=(8, 4))}),),
        warmup_shapes=(),
        trt_rtx=TrtRtx(version=V, cuda_flavour="cu13"),
        weights=store,
        skeleton=Skeleton(file=FileRef.for_content("skeleton", _sha("s"), 10)),
        engines=engines,
        runtime_caches=caches,
    )


GPUS = {
    "rtx4090": Gpu(
        index=0, name="NVIDIA GeForce RTX 4090", pci_device_id=0x2684, uuid="GPU-a", sm=89, total_memory=24 << 30
    ),
    "rtx4080": Gpu(
        index=0, name="NVIDIA GeForce RTX 4080", pci_device_id=0x2704, uuid="GPU-b", sm=89, total_memory=16 << 30
    ),
    "rtx5090": Gpu(
        index=0, name="NVIDIA GeForce RTX 5090", pci_device_id=0x2B85, uuid="GPU-c", sm=120, total_memory=32 << 30
    ),
    "rtx2080": Gpu(
        index=0, name="NVIDIA GeForce RTX 2080", pci_device_id=0x1E82, uuid="GPU-d", sm=75, total_memory=8 << 30
    ),
    "h100": Gpu(
        index=0, name="NVIDIA H100 80GB HBM3", pci_device_id=0x2330, uuid="GPU-e", sm=90, total_memory=80 << 30
    ),
    "b200": Gpu(index=0, name="NVIDIA B200", pci_device_id=0x2901, uuid="GPU-f", sm=100, total_memory=180 << 30),
}


def machine(gpu: str | None = "rtx4090", **kw) -> Machine:
    base = dict(
        os="linux",
        platform="linux_x86_64",
        cpu_arch="x86_64",
        python="3.11",
        trt_rtx_version=V,
        cuda_flavour="cu13",
        driver_version="580.95.05",
        driver_cuda_version=13000,
        gpus=(GPUS[gpu],) if gpu else (),
        problem=None if gpu else "no NVIDIA driver found (libcuda could not be loaded)",
    )
    base.update(kw)
    return Machine(**base)


WL89, WL120 = engine("weightless", (89,)), engine("weightless", (120,))
WF_ALL, WF_DEFAULT = engine("weightful", (75, 80, 86, 89, 120)), engine("weightful", ())
WF_OLD = engine("weightful", (89,), version="1.6.0.0")
WF_WIN = engine("weightful", (89,), platform="windows_amd64")


def taken(choices):
    [c] = [c for c in choices if c.taken]
    return c


@pytest.mark.parametrize(
    "engines, m, kind, index, words",
    [
        ((WF_ALL, WL89), machine("rtx4090"), "weightless", 1, "weightless engine built for SM 8.9"),
        ((WF_ALL, WL120), machine("rtx4090"), "weightful", 0, "weightful engine covering SM 8.9"),
        ((WF_DEFAULT,), machine("rtx5090"), "weightful", 0, "covering SM 12.0"),
        (
            (WF_DEFAULT,),
            machine("rtx2080"),
            "build",
            None,
            "build a weightless engine",
        ),  # Turing is not in the default set
        ((WL89,), machine("rtx4080"), "weightless", 0, "SM 8.9"),  # another SKU of the same SM: engines go by SM
        ((WF_OLD,), machine("rtx4090"), "build", None, "build"),
        ((WF_WIN,), machine("rtx4090"), "build", None, "build"),
        ((WF_ALL, WL89), machine("h100"), "fallback", None, "ONNX Runtime"),
        ((WF_ALL,), machine("b200"), "fallback", None, "ONNX Runtime"),
        ((WF_ALL,), machine(None), "fallback", None, "ONNX Runtime"),
        ((WF_ALL,), machine("rtx4090", trt_rtx_version=None, cuda_flavour=None), "fallback", None, "ONNX Runtime"),
        (
            (WF_ALL,),
            machine("rtx4090", driver_version="560.35", driver_cuda_version=12060),
            "fallback",
            None,
            "ONNX Runtime",
        ),
        ((WF_ALL,), machine("rtx4090", os="darwin", platform="darwin_arm64"), "fallback", None, "ONNX Runtime"),
    ],
)
def test_engine_ranking(engines, m, kind, index, words) -> None:
    choices = rank_engines(manifest(engines), assess(m, pick_gpu(m)))
    t = taken(choices)
    assert (t.kind, t.index) == (kind, index) and words in t.reason
    assert choices[-1].kind == "fallback" or any(c.kind == "fallback" for c in choices)
    assert all(c.reason for c in choices), "every candidate says why"


@pytest.mark.parametrize(
    "m, words",
    [
        (machine("h100"), "compute capability 9.0 (Hopper"),
        (machine("b200"), "compute capability 10.0"),
        (machine(None), "no NVIDIA driver found"),
        (machine("rtx4090", driver_version="560.35", driver_cuda_version=12060), "update the NVIDIA driver"),
        (machine("rtx4090", trt_rtx_version=None, cuda_flavour=None), "tensorrt_rtx is not installed"),
    ],
)
def test_why_trt_rtx_cannot_run_is_said_in_words(m, words) -> None:
    choices = rank_engines(manifest((WF_ALL, WL89)), assess(m, pick_gpu(m)))
    passed = [c for c in choices if c.kind in ("weightless", "weightful", "build")]
    assert passed and all(not c.viable and words in c.reason for c in passed)


@pytest.mark.parametrize(
    "eng, m, words",
    [
        (WF_OLD, machine(), "built with TensorRT for RTX 1.6.0.0, but 1.7.1.116 is installed"),
        (WF_WIN, machine(), "built for windows_amd64, this machine is linux_x86_64"),
        (WL120, machine(), "weightless engine for SM 12.0, this GPU is SM 8.9"),
        (WF_DEFAULT, machine("rtx2080"), "does not cover this GPU's SM 7.5"),
    ],
)
def test_passed_over_engines_say_why(eng, m, words) -> None:
    [c] = [c for c in rank_engines(manifest((eng,)), assess(m, pick_gpu(m))) if c.index == 0]
    assert not c.viable and words in c.reason


def test_ranked_below_is_said_for_usable_engines() -> None:
    choices = rank_engines(manifest((WF_ALL, WL89)), assess(machine(), GPUS["rtx4090"]))
    assert [c.kind for c in choices if c.viable] == ["weightless", "weightful", "build", "fallback"]
    assert all(c.reason.startswith("usable, ranked below") for c in choices if c.viable and not c.taken)


EXACT = key()
NEWER_DRIVER_HERE = key(driver_version="580.65.06")  # made on an older driver of the same major
NEWER_DRIVER_CACHE = key(driver_version="580.99.01")  # made on a newer driver than this machine's
OTHER_MAJOR = key(driver_version="575.64")
OTHER_SKU = key(gpu_name="NVIDIA GeForce RTX 4080", pci_device_id=0x2704)
OTHER_TRT = key(trt_rtx_version="1.6.0.0")
OTHER_OS = key(os="windows")
OTHER_FLAVOUR = key(cuda_flavour="cu12")
CIG = key(cig=True)


@pytest.mark.parametrize(
    "made, kind, words",
    [
        (EXACT, "bundled_exact", "made on this GPU model"),
        (NEWER_DRIVER_HERE, "bundled_compatible", "may still accept"),
        (NEWER_DRIVER_CACHE, "bundled_mismatch", "older 580.95.05 (a cache needs the same or a newer driver)"),
        (OTHER_MAJOR, "bundled_mismatch", "another major version"),
        (OTHER_SKU, "bundled_mismatch", "caches are tied to the GPU model"),
        (OTHER_TRT, "bundled_mismatch", "made with TensorRT for RTX 1.6.0.0"),
        (OTHER_OS, "bundled_mismatch", "made on windows"),
        (OTHER_FLAVOUR, "bundled_mismatch", "cu12 build"),
        (CIG, "bundled_mismatch", "CUDA-in-Graphics"),
    ],
)
def test_cache_classification(made, kind, words) -> None:
    k, why = classify_cache(made, EXACT)
    assert k == kind and words in why


def test_cache_ranking_user_then_exact_then_compatible_then_none() -> None:
    caches = (
        cache(OTHER_SKU, (WL89,)),
        cache(NEWER_DRIVER_HERE, (WL89,)),
        cache(EXACT, (WL89,), created=1),
        cache(EXACT, (WL89,), created=2),
    )
    m = manifest((WL89,), caches)
    with_user = rank_caches(m, assess(machine(), GPUS["rtx4090"]), user_cache_available=True)
    assert [(c.kind, c.index) for c in with_user if c.viable] == [
        ("user_cache", None),
        ("bundled_exact", 3),
        ("bundled_exact", 2),
        ("bundled_compatible", 1),
        ("none", None),
    ]
    assert taken(with_user).kind == "user_cache"
    without = rank_caches(m, assess(machine(), GPUS["rtx4090"]), user_cache_available=False)
    assert (taken(without).kind, taken(without).index) == ("bundled_exact", 3)  # the newest exact one
    [sku] = [c for c in without if c.index == 0]
    assert not sku.viable and "RTX 4080" in sku.reason


def test_no_cache_when_trt_rtx_cannot_run() -> None:
    m = manifest((WL89,), (cache(EXACT, (WL89,)),))
    choices = rank_caches(m, assess(machine("h100"), GPUS["h100"]), user_cache_available=True)
    assert taken(choices).kind == "none"
    assert all("no TRT-RTX session on this machine" in c.reason for c in choices if c.kind != "none")


def test_pick_gpu_prefers_a_supported_one() -> None:
    m = machine(
        "h100",
        gpus=(GPUS["h100"], Gpu(index=1, name="RTX A6000", pci_device_id=0x2230, uuid="", sm=86, total_memory=1)),
    )
    assert pick_gpu(m).index == 1 and pick_gpu(m, 0).index == 0 and pick_gpu(m, 5) is None
    assert pick_gpu(machine(None)) is None
