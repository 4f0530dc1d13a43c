"""What this machine is: OS, CPU, TRT-RTX install, NVIDIA driver and GPUs, probed without a CUDA context.

No driver, no GPU, or no cuda-python are normal outcomes: ``probe()`` never raises, it describes the
problem in ``Machine.problem`` so that choice, ``doctor`` and the report can say it in words.
"""

from __future__ import annotations

import dataclasses
import os
import platform as _platform
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .targets import SUPPORT_TEXT, family_text, sm_text, trt_rtx_supports

# The driver a CUDA flavour needs, as cuDriverGetVersion reports it (1000 * major + 10 * minor).
_MIN_DRIVER_CUDA = {"cu12": 12000, "cu13": 13000}
# Distribution names that carry the `tensorrt_rtx` import package, with the CUDA flavour each implies.
# (the bindings wheels are what a --target or vendored install keeps; the metapackages may be absent)
_TRT_DISTS = (
    ("tensorrt-rtx-cu13", "cu13"),
    ("tensorrt-rtx-cu13-bindings", "cu13"),
    ("tensorrt-rtx-cu12", "cu12"),
    ("tensorrt-rtx-cu12-bindings", "cu12"),
    ("tensorrt-rtx", None),
)
_PROC_DRIVER_VERSION = "/proc/driver/nvidia/version"
_SYSFS_PCI = "/sys/bus/pci/devices"


@dataclass(frozen=True, kw_only=True)
class Gpu:
    index: int
    name: str  # e.g. "NVIDIA GeForce RTX 4090"
    pci_device_id: int  # the SKU (PCI product id), e.g. 0x2684; 0 when NVML and sysfs could not tell
    uuid: str  # "GPU-xxxxxxxx-..."; stable across reboots, unlike the index
    sm: int  # compute capability as 10 * major + minor, e.g. 89, 90, 120
    total_memory: int  # bytes
    pci_bus_id: str = ""  # "0000:19:00.0"

    @property
    def sm_text(self) -> str:
        return sm_text(self.sm)


@dataclass(frozen=True, kw_only=True)
class Machine:
    os: str  # "linux" | "windows" | "darwin" | ...
    platform: str  # "linux_x86_64" | "windows_amd64" | other
    cpu_arch: str
    python: str
    trt_rtx_version: str | None  # None when tensorrt_rtx is not installed
    cuda_flavour: str | None  # "cu13" | "cu12" | None
    driver_version: str | None  # e.g. "580.95.05"; None without a driver (or when it cannot be read)
    driver_cuda_version: int | None  # from cuDriverGetVersion, e.g. 13000 for CUDA 13.0
    gpus: tuple[Gpu, ...] = ()
    problem: str | None = None  # why no GPU could be probed, in words
    cig: bool = False  # CUDA in Graphics: the shim never creates CiG contexts
    notes: tuple[str, ...] = field(default=())  # things worth knowing that are not a problem

    @property
    def driver_cuda_text(self) -> str | None:
        v = self.driver_cuda_version
        return None if v is None else f"{v // 1000}.{(v % 1000) // 10}"

    def driver_problem(self) -> str | None:
        """Why the driver is too old for the installed TRT-RTX flavour, or None."""
        need = _MIN_DRIVER_CUDA.get(self.cuda_flavour or "")
        if need is None or self.driver_cuda_version is None or self.driver_cuda_version >= need:
            return None
        return (
            f"the NVIDIA driver {self.driver_version or '?'} supports CUDA {self.driver_cuda_text}, but TensorRT for RTX "
            f"({self.cuda_flavour}) needs a driver for CUDA {need // 1000}.0 or newer: update the NVIDIA driver"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = [dict(asdict(g), sm_text=g.sm_text, trt_rtx_supported=trt_rtx_supports(g.sm)) for g in self.gpus]
        d["notes"] = list(self.notes)
        return d


def unsupported_reason(gpu: Gpu) -> str | None:
    if trt_rtx_supports(gpu.sm):
        return None
    family = family_text(gpu.sm)
    return (
        f"GPU {gpu.index} {gpu.name} has compute capability {gpu.sm_text}{family}, which TensorRT for RTX does not "
        f"support ({SUPPORT_TEXT})"
    )


# ------------------------------------------------------------------------------------------- probing
def probe(
    *, driver: Any = None, nvml: Any = None, proc_version_path: str = _PROC_DRIVER_VERSION, sysfs_pci: str = _SYSFS_PCI
) -> Machine:
    """Describe this machine. ``driver``/``nvml`` replace cuda.bindings modules (tests); never raises."""
    os_name = {"win32": "windows", "cygwin": "windows"}.get(
        sys.platform, sys.platform.rstrip("0123456789") or sys.platform
    )
    arch = _platform.machine().lower()
    plat = {
        ("linux", "x86_64"): "linux_x86_64",
        ("linux", "amd64"): "linux_x86_64",
        ("windows", "amd64"): "windows_amd64",
        ("windows", "x86_64"): "windows_amd64",
    }.get((os_name, arch), f"{os_name}_{arch}")
    trt_version, flavour = trt_rtx_install()
    notes: list[str] = []
    gpus: tuple[Gpu, ...] = ()
    driver_cuda: int | None = None
    problem: str | None = None
    try:
        driver_cuda, gpus = _probe_driver(driver)
    except _NoGpu as e:
        problem = str(e)
    driver_version = None
    if problem is None or "no CUDA-capable device" in problem:
        driver_version, skus, note = _nvml_facts(nvml, proc_version_path, [g.pci_bus_id for g in gpus], sysfs_pci)
        gpus = tuple(dataclasses.replace(g, pci_device_id=skus.get(g.pci_bus_id, 0)) for g in gpus)
        if note:
            notes.append(note)
        if any(g.pci_device_id == 0 for g in gpus):
            notes.append("PCI device id (SKU) unknown for some GPU: runtime caches cannot be matched to it exactly")
    if trt_version is None:
        notes.append("tensorrt_rtx is not installed: only the ONNX Runtime fallback can run bundles here")
    return Machine(
        os=os_name,
        platform=plat,
        cpu_arch=arch,
        python=_platform.python_version(),
        trt_rtx_version=trt_version,
        cuda_flavour=flavour,
        driver_version=driver_version,
        driver_cuda_version=driver_cuda,
        gpus=gpus,
        problem=problem,
        notes=tuple(notes),
    )


def _dist_versions(names: list[str]) -> dict[str, str]:
    """Versions of the named distributions from their ``*.dist-info`` folders on sys.path (what pip writes), first
    found wins. Only when none is found there does importlib.metadata look (eggs, zips, odd installers): its import
    alone costs ~12 ms of an app's start."""
    wanted = {re.sub(r"[-_.]+", "_", n).lower(): n for n in names}
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as it:
                for d in it:
                    if d.name.endswith(".dist-info"):
                        dist, _, version = d.name[: -len(".dist-info")].partition("-")
                        name = wanted.get(re.sub(r"[-_.]+", "_", dist).lower())
                        if name and version and name not in found:
                            found[name] = version
        except OSError:
            continue
    missing = [n for n in names if n not in found]
    if missing and not found:
        import importlib.metadata

        for n in missing:
            try:
                found[n] = importlib.metadata.version(n)
            except importlib.metadata.PackageNotFoundError:
                pass
    return found


def trt_rtx_install() -> tuple[str | None, str | None]:
    """(version, CUDA flavour) of the installed TRT-RTX, or (None, None); the build and the probe both ask here."""
    # Read the installed distributions rather than importing tensorrt_rtx: the import loads ~230 MB of libraries.
    version, flavour = None, None
    versions = _dist_versions([d for d, _ in _TRT_DISTS])
    for dist, dist_flavour in _TRT_DISTS:
        v = versions.get(dist)
        if v is None:
            continue
        version = version or v
        flavour = flavour or dist_flavour
    if version is not None and flavour is None:
        flavour = "cu13"  # the plain `tensorrt-rtx` metapackage has pulled the CUDA 13 build since 1.7
    return version, flavour


class _NoGpu(Exception):
    pass


def _probe_driver(driver: Any) -> tuple[int | None, tuple[Gpu, ...]]:
    if driver is None:  # ctypes, not cuda.bindings.driver: ~1 ms where that import costs ~47 (runtime_shim/nvlibs.py)
        from .nvlibs import CudaDriver

        try:
            driver = CudaDriver()
        except OSError as e:
            raise _NoGpu(f"no NVIDIA driver found (libcuda could not be loaded: {_first_line(e)})") from None
    try:
        (err,) = driver.cuInit(0)
    except Exception as e:  # cuda-python raises when libcuda itself cannot be loaded: no driver at all
        raise _NoGpu(f"no NVIDIA driver found (libcuda could not be loaded: {_first_line(e)})") from None
    ok = driver.CUresult.CUDA_SUCCESS
    if err != ok:
        name = _err_name(driver, err)
        what = "no CUDA-capable device" if "NO_DEVICE" in name else "the NVIDIA driver did not initialize"
        raise _NoGpu(f"{what} (cuInit returned {name})")
    err, cuda_version = driver.cuDriverGetVersion()
    cuda_version = int(cuda_version) if err == ok else None
    err, count = driver.cuDeviceGetCount()
    if err != ok:
        raise _NoGpu(f"cannot count GPUs (cuDeviceGetCount returned {_err_name(driver, err)})")
    if count == 0:
        raise _NoGpu("the NVIDIA driver is loaded but reports no GPU (cuDeviceGetCount = 0)")
    attr = driver.CUdevice_attribute
    gpus = []
    for index in range(count):
        err, dev = driver.cuDeviceGet(index)
        if err != ok:
            continue
        name = _checked(driver, driver.cuDeviceGetName(256, dev), b"?")
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace") if isinstance(name, (bytes, bytearray)) else str(name)
        major = _checked(driver, driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), 0)
        minor = _checked(driver, driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), 0)
        # CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID is the slot number on the bus, not the product id (an H200 said 6):
        # keep the bus id and ask NVML or sysfs for the SKU.
        bus = _checked(driver, driver.cuDeviceGetPCIBusId(32, dev), b"")
        bus = bus.split(b"\0", 1)[0].decode("ascii", "replace") if isinstance(bus, (bytes, bytearray)) else str(bus)
        uuid = _checked(driver, driver.cuDeviceGetUuid(dev), None)
        memory = _checked(driver, driver.cuDeviceTotalMem(dev), 0)
        gpus.append(
            Gpu(
                index=index,
                name=name,
                pci_device_id=0,
                uuid=_uuid_text(uuid),
                sm=10 * int(major) + int(minor),
                total_memory=int(memory),
                pci_bus_id=_norm_bus(bus),
            )
        )
    return cuda_version, tuple(gpus)


def _checked(driver: Any, result: tuple, default: Any) -> Any:
    # Every cuda-python call returns (CUresult, value...): an error means "unknown", never an exception here.
    err, *values = result
    return default if err != driver.CUresult.CUDA_SUCCESS or not values else values[0]


def _err_name(driver: Any, err: Any) -> str:
    try:
        e2, name = driver.cuGetErrorName(err)
        if e2 == driver.CUresult.CUDA_SUCCESS and name:
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    return getattr(err, "name", str(err))


def _uuid_text(uuid: Any) -> str:
    raw = getattr(uuid, "bytes", uuid)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 16:
        return ""
    h = bytes(raw).hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"  # the form nvidia-smi prints


def _norm_bus(bus: str) -> str:
    # CUDA says "0000:19:00.0", NVML "00000000:19:00.0", sysfs "0000:19:00.0": compare one form.
    m = re.match(r"^([0-9A-Fa-f]+):([0-9A-Fa-f]+):([0-9A-Fa-f]+)\.([0-7])$", bus.strip())
    if not m:
        return bus.strip().lower()
    return f"{int(m.group(1), 16):04x}:{int(m.group(2), 16):02x}:{int(m.group(3), 16):02x}.{m.group(4)}"


def _nvml_facts(
    nvml: Any, proc_path: str, bus_ids: list[str], sysfs: str
) -> tuple[str | None, dict[str, int], str | None]:
    """(display-driver version like "580.95.05", {bus id: SKU}, note): NVML where cuda.bindings has it, else
    /proc/driver/nvidia/version and /sys/bus/pci (Linux)."""
    if nvml is None:  # ctypes, not cuda.bindings.nvml, whose import costs ~100 ms (it imports numpy)
        from .nvlibs import Nvml

        try:
            nvml = Nvml()
        except OSError:
            nvml = None
    version, skus, nvml_problem = None, {}, None
    if nvml is not None:
        try:
            nvml.init_v2()
            try:
                v = nvml.system_get_driver_version()
                version = v.decode() if isinstance(v, bytes) else str(v)
                for bus in bus_ids:
                    try:
                        info = nvml.device_get_pci_info_v3(nvml.device_get_handle_by_pci_bus_id_v2(bus))
                        skus[bus] = int(info.pci_device_id) >> 16  # low 16 bits: the vendor (0x10de)
                    except Exception:
                        pass
            finally:
                nvml.shutdown()
        except Exception as e:
            nvml_problem = _first_line(e)
    for bus in bus_ids:
        if bus not in skus:
            try:
                with open(os.path.join(sysfs, bus, "device"), encoding="ascii") as f:
                    skus[bus] = int(f.read().strip(), 16)
            except (OSError, ValueError):
                pass
    if version is None:
        try:
            with open(proc_path, encoding="utf-8", errors="replace") as f:
                m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", f.read())
            version = m.group(1) if m else None
        except OSError:
            pass
    note = None
    if version is None and (nvml_problem or os.path.exists(proc_path)):
        note = f"driver version unknown (NVML: {nvml_problem or 'not available'}; {proc_path} unreadable)"
    return version, skus, note


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
