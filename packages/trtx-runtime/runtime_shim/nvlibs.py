"""ctypes views of the NVIDIA driver (libcuda) and NVML for the probe, shaped like cuda-python's modules.

Why not cuda-python here: importing ``cuda.bindings.driver`` costs ~47 ms and ``cuda.bindings.nvml`` ~100 ms (it
imports numpy), which every app start would pay before it knows whether a GPU is there; the few calls the probe
makes cost ~1 ms through ctypes. Each method returns what cuda-python's does (an error code, then the values), so
machine._probe_driver and _nvml_facts take either, and tests replay answers with fakes of the same shape.
The libraries are found by the system's loader, as cuda-python finds them (driver libraries ship with the driver).
"""

from __future__ import annotations

import ctypes
import sys
from types import SimpleNamespace
from typing import Any


def _load(linux: str, windows: str) -> Any:
    """The library by the system loader's search; OSError when absent."""
    if sys.platform == "win32":
        return ctypes.WinDLL(windows)
    return ctypes.CDLL(linux)


class CudaDriver:
    """The driver API calls the probe makes: cuInit, cuDriverGetVersion, cuDeviceGet*, cuGetErrorName."""

    CUresult = SimpleNamespace(CUDA_SUCCESS=0)
    CUdevice_attribute = SimpleNamespace(
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR=75, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR=76
    )

    def __init__(self) -> None:
        self.lib = _load("libcuda.so.1", "nvcuda.dll")  # OSError: no driver
        c_int, c_uint, ptr = ctypes.c_int, ctypes.c_uint, ctypes.POINTER
        self._sig("cuInit", c_uint)
        self._sig("cuDriverGetVersion", ptr(c_int))
        self._sig("cuDeviceGetCount", ptr(c_int))
        self._sig("cuDeviceGet", ptr(c_int), c_int)
        self._sig("cuDeviceGetName", ctypes.c_char_p, c_int, c_int)
        self._sig("cuDeviceGetAttribute", ptr(c_int), c_int, c_int)
        self._sig("cuDeviceGetPCIBusId", ctypes.c_char_p, c_int, c_int)
        self._sig("cuGetErrorName", c_int, ptr(ctypes.c_char_p))
        self._uuid = self._first("cuDeviceGetUuid_v2", "cuDeviceGetUuid")
        self._uuid.argtypes, self._uuid.restype = [ctypes.c_char_p, c_int], c_int
        self._mem = self._first("cuDeviceTotalMem_v2", "cuDeviceTotalMem")
        self._mem.argtypes, self._mem.restype = [ptr(ctypes.c_size_t), c_int], c_int

    def _sig(self, name: str, *args: Any) -> None:
        f = getattr(self.lib, name)
        f.argtypes, f.restype = list(args), ctypes.c_int

    def _first(self, *names: str) -> Any:
        for name in names:
            try:
                return getattr(self.lib, name)
            except AttributeError:
                continue
        raise OSError(f"the NVIDIA driver library has none of {', '.join(names)}")

    def cuInit(self, flags: int) -> tuple[int]:
        return (self.lib.cuInit(flags),)

    def cuDriverGetVersion(self) -> tuple[int, int]:
        v = ctypes.c_int()
        return self.lib.cuDriverGetVersion(ctypes.byref(v)), v.value

    def cuDeviceGetCount(self) -> tuple[int, int]:
        n = ctypes.c_int()
        return self.lib.cuDeviceGetCount(ctypes.byref(n)), n.value

    def cuDeviceGet(self, index: int) -> tuple[int, int]:
        dev = ctypes.c_int()
        return self.lib.cuDeviceGet(ctypes.byref(dev), index), dev.value

    def cuDeviceGetName(self, size: int, dev: int) -> tuple[int, bytes]:
        buf = ctypes.create_string_buffer(size)
        return self.lib.cuDeviceGetName(buf, size, dev), buf.raw

    def cuDeviceGetAttribute(self, attr: int, dev: int) -> tuple[int, int]:
        v = ctypes.c_int()
        return self.lib.cuDeviceGetAttribute(ctypes.byref(v), int(attr), dev), v.value

    def cuDeviceGetPCIBusId(self, size: int, dev: int) -> tuple[int, bytes]:
        buf = ctypes.create_string_buffer(size)
        return self.lib.cuDeviceGetPCIBusId(buf, size, dev), buf.raw

    def cuDeviceGetUuid(self, dev: int) -> tuple[int, bytes]:
        buf = ctypes.create_string_buffer(16)
        return self._uuid(buf, dev), buf.raw

    def cuDeviceTotalMem(self, dev: int) -> tuple[int, int]:
        v = ctypes.c_size_t()
        return self._mem(ctypes.byref(v), dev), v.value

    def cuGetErrorName(self, err: int) -> tuple[int, bytes]:
        name = ctypes.c_char_p()
        return self.lib.cuGetErrorName(int(err), ctypes.byref(name)), name.value or b""


class _PciInfo(ctypes.Structure):
    # nvmlPciInfo_t (nvml.h, v3): the busIdLegacy field, then the numbers, then the bus id
    _fields_ = [
        ("busIdLegacy", ctypes.c_char * 16),
        ("domain", ctypes.c_uint),
        ("bus", ctypes.c_uint),
        ("device", ctypes.c_uint),
        ("pciDeviceId", ctypes.c_uint),
        ("pciSubSystemId", ctypes.c_uint),
        ("busId", ctypes.c_char * 32),
    ]


class Nvml:
    """The NVML calls the probe makes, raising RuntimeError on an NVML error as cuda.bindings.nvml does."""

    def __init__(self) -> None:
        self.lib = _load("libnvidia-ml.so.1", "nvml.dll")  # OSError: no NVML

    def _call(self, name: str, *args: Any) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise RuntimeError(f"{name} returned NVML error {status}")

    def init_v2(self) -> None:
        self._call("nvmlInit_v2")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def system_get_driver_version(self) -> str:
        buf = ctypes.create_string_buffer(96)
        self._call("nvmlSystemGetDriverVersion", buf, ctypes.c_uint(96))
        return buf.value.decode("ascii", "replace")

    def device_get_handle_by_pci_bus_id_v2(self, bus: str) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        self._call("nvmlDeviceGetHandleByPciBusId_v2", ctypes.c_char_p(bus.encode()), ctypes.byref(handle))
        return handle

    def device_get_pci_info_v3(self, handle: ctypes.c_void_p) -> SimpleNamespace:
        info = _PciInfo()
        self._call("nvmlDeviceGetPciInfo_v3", handle, ctypes.byref(info))
        return SimpleNamespace(pci_device_id=info.pciDeviceId, bus_id=info.busId.decode("ascii", "replace"))
