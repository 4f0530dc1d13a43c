"""The probe: this machine for real (no driver here), and driver answers replayed by a fake of cuda.bindings.driver."""

from __future__ import annotations

import enum
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime_shim.cache_key import cache_key_for
from runtime_shim.errors import MachineError
from runtime_shim.machine import Gpu, Machine, probe, trt_rtx_supports, unsupported_reason


class _CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NO_DEVICE = 100


class _Attr(enum.IntEnum):
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
    CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class FakeCudaDriver:
    """Stands in for cuda.bindings.driver (no driver on this machine): every call returns (CUresult, value...)."""

    CUresult = _CUresult
    CUdevice_attribute = _Attr

    def __init__(
        self,
        gpus: list[dict],
        *,
        init: _CUresult = _CUresult.CUDA_SUCCESS,
        raise_on_init: Exception | None = None,
        cuda_version: int = 13000,
        broken_attr: _Attr | None = None,
    ) -> None:
        self.gpus, self.init, self.raise_on_init, self.cuda_version, self.broken_attr = (
            gpus,
            init,
            raise_on_init,
            cuda_version,
            broken_attr,
        )
        self.calls: list[str] = []

    def cuInit(self, flags: int):
        self.calls.append("cuInit")
        if self.raise_on_init:
            raise self.raise_on_init
        return (self.init,)

    def cuGetErrorName(self, err):
        return (_CUresult.CUDA_SUCCESS, err.name.encode())

    def cuDriverGetVersion(self):
        return (_CUresult.CUDA_SUCCESS, self.cuda_version)

    def cuDeviceGetCount(self):
        return (_CUresult.CUDA_SUCCESS, len(self.gpus))

    def cuDeviceGet(self, i):
        return (_CUresult.CUDA_SUCCESS, i)

    def cuDeviceGetName(self, size, dev):
        return (_CUresult.CUDA_SUCCESS, self.gpus[dev]["name"].encode().ljust(size, b"\0"))

    def cuDeviceGetAttribute(self, attr, dev):
        if attr == self.broken_attr:
            return (_CUresult.CUDA_ERROR_INVALID_VALUE, 0)
        key = {
            _Attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: "major",
            _Attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: "minor",
        }[attr]
        return (_CUresult.CUDA_SUCCESS, self.gpus[dev][key])

    def cuDeviceGetPCIBusId(self, size, dev):
        return (_CUresult.CUDA_SUCCESS, f"0000:{0x19 + dev:02X}:00.0".encode().ljust(size, b"\0"))

    def cuDeviceGetUuid(self, dev):
        return (_CUresult.CUDA_SUCCESS, SimpleNamespace(bytes=bytes(range(dev, dev + 16))))

    def cuDeviceTotalMem(self, dev):
        return (_CUresult.CUDA_SUCCESS, self.gpus[dev]["mem"])


class FakeNvml:
    """Stands in for cuda.bindings.nvml: driver version, and the PCI product id (SKU) by bus id."""

    def __init__(self, version: str | None, skus: dict[str, int] | None = None) -> None:
        self.version, self.skus = version, skus or {}

    def device_get_handle_by_pci_bus_id_v2(self, bus: str) -> str:
        if bus not in self.skus:
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        return bus

    def device_get_pci_info_v3(self, handle: str):
        return SimpleNamespace(pci_device_id=(self.skus[handle] << 16) | 0x10DE)

    def init_v2(self) -> None:
        if self.version is None:
            raise RuntimeError("NVML_ERROR_LIBRARY_NOT_FOUND")

    def system_get_driver_version(self) -> str:
        return self.version

    def shutdown(self) -> None:
        pass


H100 = {"name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0, "pci": 0x2330, "mem": 80 * 2**30}
RTX4090 = {"name": "NVIDIA GeForce RTX 4090", "major": 8, "minor": 9, "pci": 0x2684, "mem": 24 * 2**30}


def test_probe_on_this_machine_describes_no_driver_without_raising() -> None:
    m = probe()
    assert m.os == "linux" and m.platform == "linux_x86_64"
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        assert m.trt_rtx_version and m.cuda_flavour in ("cu12", "cu13")
    if not m.gpus:  # the CPU machine this suite normally runs on
        assert m.problem and ("driver" in m.problem or "device" in m.problem)
    json.dumps(m.to_dict())  # renderable as JSON for doctor --json


def test_probe_reads_every_gpu_through_the_driver_api() -> None:
    m = probe(
        driver=FakeCudaDriver([H100, RTX4090]),
        nvml=FakeNvml("580.95.05", {"0000:19:00.0": 0x2330, "0000:1a:00.0": 0x2684}),
    )
    assert m.problem is None and m.notes == () and m.driver_version == "580.95.05" and m.driver_cuda_version == 13000
    assert [g.sm for g in m.gpus] == [90, 89]
    h100, rtx = m.gpus
    assert h100.name == "NVIDIA H100 80GB HBM3" and h100.pci_device_id == 0x2330 and h100.total_memory == 80 * 2**30
    assert h100.uuid == "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f" and h100.pci_bus_id == "0000:19:00.0"
    assert rtx.pci_device_id == 0x2684
    assert not trt_rtx_supports(h100.sm) and trt_rtx_supports(rtx.sm)
    assert "9.0" in unsupported_reason(h100) and "Hopper" in unsupported_reason(h100)
    assert unsupported_reason(rtx) is None


@pytest.mark.parametrize(
    "driver, words",
    [
        (
            FakeCudaDriver(
                [],
                raise_on_init=RuntimeError(
                    '"cuda" is an NVIDIA driver library and can only be found via system search'
                ),
            ),
            "no NVIDIA driver found",
        ),
        (
            FakeCudaDriver([], init=_CUresult.CUDA_ERROR_NO_DEVICE),
            "no CUDA-capable device (cuInit returned CUDA_ERROR_NO_DEVICE)",
        ),
        (FakeCudaDriver([]), "reports no GPU"),
    ],
)
def test_no_driver_or_no_gpu_is_a_described_outcome(driver: FakeCudaDriver, words: str) -> None:
    m = probe(driver=driver, nvml=FakeNvml(None), proc_version_path="/nonexistent")
    assert m.gpus == () and words in m.problem


def test_a_failing_attribute_degrades_to_unknown_not_an_exception(tmp_path) -> None:
    m = probe(
        driver=FakeCudaDriver([RTX4090], broken_attr=_Attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        nvml=FakeNvml("580.95.05"),
        sysfs_pci=str(tmp_path),
    )
    assert m.gpus[0].sm == 80 and m.gpus[0].pci_device_id == 0
    assert any("SKU) unknown" in n for n in m.notes)


def test_sku_falls_back_to_sysfs_when_nvml_cannot_tell(tmp_path) -> None:
    (tmp_path / "0000:19:00.0").mkdir()
    (tmp_path / "0000:19:00.0" / "device").write_text("0x2684\n")
    m = probe(
        driver=FakeCudaDriver([RTX4090]), nvml=FakeNvml(None), proc_version_path="/nonexistent", sysfs_pci=str(tmp_path)
    )
    assert m.gpus[0].pci_device_id == 0x2684


def test_driver_version_falls_back_to_the_kernel_module_file(tmp_path) -> None:
    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  (dvs-builder@U22)\n"
        "GCC version:  gcc version 12.3.0\n"
    )
    m = probe(driver=FakeCudaDriver([RTX4090]), nvml=FakeNvml(None), proc_version_path=str(proc))
    assert m.driver_version == "580.95.05"
    m = probe(driver=FakeCudaDriver([RTX4090]), nvml=FakeNvml(None), proc_version_path=str(tmp_path / "missing"))
    assert m.driver_version is None and any("driver version unknown" in n for n in m.notes)


@pytest.mark.parametrize(
    "sm, ok",
    [
        (75, True),
        (80, True),
        (86, True),
        (89, True),
        (120, True),
        (121, True),
        (130, True),
        (70, False),
        (87, False),
        (90, False),
        (100, False),
        (103, False),
        (110, False),
    ],
)
def test_trt_rtx_supports(sm: int, ok: bool) -> None:
    assert trt_rtx_supports(sm) is ok


def _machine(**kw) -> Machine:
    base = dict(
        os="linux",
        platform="linux_x86_64",
        cpu_arch="x86_64",
        python="3.11",
        trt_rtx_version="1.7.1.116",
        cuda_flavour="cu13",
        driver_version="580.95.05",
        driver_cuda_version=13000,
    )
    base.update(kw)
    return Machine(**base)


def test_cache_key_records_what_trt_rtx_compares() -> None:
    gpu = Gpu(index=0, name="NVIDIA GeForce RTX 4090", pci_device_id=0x2684, uuid="", sm=89, total_memory=1)
    key = cache_key_for(_machine(), gpu)
    assert (
        key.os,
        key.gpu_name,
        key.pci_device_id,
        key.sm,
        key.driver_version,
        key.cuda_flavour,
        key.trt_rtx_version,
        key.cig,
    ) == ("linux", "NVIDIA GeForce RTX 4090", 0x2684, 89, "580.95.05", "cu13", "1.7.1.116", False)
    with pytest.raises(MachineError, match="unknown driver version"):
        cache_key_for(_machine(driver_version=None), gpu)


def test_an_old_driver_is_said_in_words() -> None:
    assert "update the NVIDIA driver" in _machine(driver_version="560.35", driver_cuda_version=12060).driver_problem()
    assert _machine().driver_problem() is None
    assert _machine(cuda_flavour="cu12", driver_cuda_version=12020).driver_problem() is None


def test_the_shim_imports_neither_tensorrt_rtx_for_probing_nor_onnx_or_click() -> None:
    code = (
        "import sys, runtime_shim; m = runtime_shim.probe(); import runtime_shim.session, runtime_shim.select, "
        "runtime_shim.user_cache, runtime_shim.fallback, runtime_shim.backend, runtime_shim.refit, runtime_shim.inputs, "
        "runtime_shim.trt.runtime, runtime_shim.trt.session; "
        "print(sorted(n for n in ('tensorrt_rtx', 'onnx', 'click', 'bundler') if n in sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


def test_probing_and_choosing_import_neither_cuda_python_nor_numpy_nor_importlib_metadata() -> None:
    """What an app start pays before it knows its GPU: ctypes views of libcuda and NVML (runtime_shim/nvlibs.py)."""
    code = (
        "import sys; from runtime_shim import machine, select, manifest; m = machine.probe(); select.pick_gpu(m); "
        "print(sorted(n for n in ('cuda.bindings.driver', 'cuda.bindings.nvml', 'numpy', 'importlib.metadata') if n in sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    # importlib.metadata is only the fallback for TRT-RTX installs without a .dist-info on sys.path
    assert out.strip() in ("[]", "['importlib.metadata']")
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        assert out.strip() == "[]"


def test_trt_rtx_version_from_dist_info_agrees_with_importlib_metadata() -> None:
    import importlib.metadata

    from runtime_shim import machine

    names = [d for d, _ in machine._TRT_DISTS] + ["zstandard", "no-such-distribution-xyz"]
    fast = machine._dist_versions(names)
    for n in names:
        try:
            assert fast.get(n) == importlib.metadata.version(n), n
        except importlib.metadata.PackageNotFoundError:
            assert n not in fast
    assert fast.get("zstandard")  # a wheel every install of the shim has
    assert (
        machine._dist_versions(["no-such-distribution-xyz"]) == {}
    )  # nothing found: importlib.metadata asked, says none


def _driver_present() -> bool:
    from runtime_shim.nvlibs import CudaDriver

    try:
        return CudaDriver().cuInit(0)[0] == 0
    except OSError:
        return False


@pytest.mark.skipif(not _driver_present(), reason="needs an NVIDIA driver (libcuda) and a GPU")
def test_the_ctypes_probe_sees_what_cuda_python_sees() -> None:
    pytest.importorskip("cuda.bindings.nvml")
    from cuda.bindings import driver, nvml

    fast, reference = probe(), probe(driver=driver, nvml=nvml)
    assert fast.gpus and fast.gpus == reference.gpus  # names, SMs, SKUs, UUIDs, memory, bus ids
    assert (fast.driver_version, fast.driver_cuda_version, fast.problem) == (
        reference.driver_version,
        reference.driver_cuda_version,
        reference.problem,
    )
