"""nvCOMP's batched zstd decoder through ctypes: finding libnvcomp, and the four C functions the GPU decoder uses.

libnvcomp statically links its CUDA runtime, so nothing else is needed. nvCOMP's zstd decoder must only ever see
verified bytes: its documentation says corrupt input is undefined behaviour, which is why the uploader hashes every
frame on the host first.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

from ..errors import MachineError
from .cuda import cuda_python_missing

NVCOMP_HINT = (
    "pip install nvidia-libnvcomp-cu13 (or -cu12 to match the driver), or set TRTX_NVCOMP_LIBRARY to libnvcomp's path"
)


class _ZstdOpts(ctypes.Structure):
    _fields_ = [("backend", ctypes.c_int), ("reserved", ctypes.c_char * 60)]  # nvcompBatchedZstdDecompressOpts_t


class _Alignments(ctypes.Structure):
    _fields_ = [("input", ctypes.c_size_t), ("output", ctypes.c_size_t), ("temp", ctypes.c_size_t)]


def find_nvcomp() -> str | None:
    """libnvcomp's path: $TRTX_NVCOMP_LIBRARY, the nvidia-libnvcomp-cu12/cu13 wheel, or the system's; None if absent."""
    env = os.environ.get("TRTX_NVCOMP_LIBRARY")
    if env:
        return env
    try:
        spec = importlib.util.find_spec("nvidia.libnvcomp")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub, pattern in (("lib64", "libnvcomp.so*"), ("lib", "libnvcomp.so*"), ("bin", "nvcomp*.dll")):
            found = sorted(Path(root, sub).glob(pattern))
            if found:
                return str(found[0])
    import ctypes.util

    return ctypes.util.find_library("nvcomp")


class Nvcomp:
    """nvCOMP's batched zstd decoder, through ctypes. Raises MachineError when the library is missing or unusable."""

    def __init__(self, path: str | None = None) -> None:
        path = path or find_nvcomp()
        if not path:
            raise MachineError("nvCOMP is not installed, so weights cannot be decoded on the GPU", hint=NVCOMP_HINT)
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise MachineError(f"cannot load nvCOMP from {path}: {e}", hint=NVCOMP_HINT) from None
        size_t, vp, pp = ctypes.c_size_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
        try:
            self._align = lib.nvcompBatchedZstdDecompressGetRequiredAlignments
            self._temp = lib.nvcompBatchedZstdDecompressGetTempSize
            self._run = lib.nvcompBatchedZstdDecompressAsync
        except AttributeError as e:
            raise MachineError(
                f"{path} lacks a function this shim needs ({e}); nvCOMP 5 or newer is required", hint=NVCOMP_HINT
            ) from None
        self._align.argtypes = [_ZstdOpts, ctypes.POINTER(_Alignments)]
        self._temp.argtypes = [size_t, size_t, _ZstdOpts, pp, size_t, vp]
        self._run.argtypes = [vp, vp, vp, vp, size_t, vp, size_t, vp, _ZstdOpts, vp, vp]
        for f in (self._align, self._temp, self._run):
            f.restype = ctypes.c_int
        self.path = path
        self.opts = _ZstdOpts()  # backend 0: nvCOMP picks (hardware decompression engine where the GPU has one)
        a = _Alignments()
        self._check(self._align(self.opts, ctypes.byref(a)), "nvcompBatchedZstdDecompressGetRequiredAlignments")
        self.input_alignment, self.output_alignment, self.temp_alignment = a.input, a.output, a.temp

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise MachineError(f"{what} failed with nvcompStatus_t {status}", hint=NVCOMP_HINT)

    def temp_bytes(self, chunks: int, max_chunk: int, total: int, stream: int) -> int:
        out = ctypes.c_size_t()
        self._check(
            self._temp(chunks, max_chunk, self.opts, ctypes.byref(out), total, stream),
            "nvcompBatchedZstdDecompressGetTempSize",
        )
        return out.value

    def decompress(
        self,
        in_ptrs: int,
        in_sizes: int,
        out_sizes: int,
        actual: int,
        count: int,
        temp: int,
        temp_bytes: int,
        out_ptrs: int,
        statuses: int,
        stream: int,
    ) -> None:
        """Enqueue the decode of ``count`` chunks; every array argument is a device address (see nvcomp/zstd.h)."""
        self._check(
            self._run(
                in_ptrs, in_sizes, out_sizes, actual, count, temp, temp_bytes, out_ptrs, self.opts, statuses, stream
            ),
            "nvcompBatchedZstdDecompressAsync",
        )


def available() -> str | None:
    """Why GPU decoding is unavailable here (None when nvCOMP and cuda-python can be loaded); cheap, no GPU work."""
    if (why := cuda_python_missing()) is not None:
        return why
    if not find_nvcomp():
        return "nvCOMP is not installed"
    if sys.platform not in ("linux", "win32"):
        return f"nvCOMP does not support {sys.platform}"
    return None
