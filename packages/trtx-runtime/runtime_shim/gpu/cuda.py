"""cuda-python for the shim's GPU code: the one lazy import of its bindings and the one check of their results.

cuda-python is optional (the `trt` extra): nothing here imports it until a GPU is used, and its absence becomes a
MachineError that says what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ..errors import MachineError


def cuda(module: str) -> Any:
    """cuda-python's ``runtime`` or ``driver`` bindings (``cuda.bindings.<module>``; before 12.6 ``cuda.cudart`` /
    ``cuda.cuda``), imported only when the GPU is used; MachineError saying what to install when absent."""
    try:
        importlib.import_module("cuda.bindings")  # the package first: a cached submodule must not hide its absence
        return importlib.import_module(f"cuda.bindings.{module}")
    except ImportError:
        try:
            importlib.import_module("cuda")
            return importlib.import_module({"runtime": "cuda.cudart", "driver": "cuda.cuda"}[module])
        except ImportError as e:
            raise MachineError(f"cuda-python is not importable ({e})", hint="pip install 'cuda-python>=12.6'") from None


def cudart() -> Any:
    """cuda-python's runtime bindings (see cuda())."""
    return cuda("runtime")


def cuda_python_missing() -> str | None:
    """Why cuda-python cannot be used here, or None; cheap: it finds the package, it does not import it."""
    try:
        found = importlib.util.find_spec("cuda") is not None
    except (ImportError, ValueError):  # a "cuda" in sys.modules set to None (tests) or without a spec
        found = False
    return None if found else "cuda-python is not installed"


def check(rt: Any, result: Any, what: str) -> Any:
    """cuda-python returns (err, value...): raise on err, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        raise MachineError(
            f"{what} failed: {name.decode(errors='replace')} ({text.decode(errors='replace')})",
            hint="check that an NVIDIA GPU and driver are present (nvidia-smi) and that GPU memory is free",
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def check_driver(drv: Any, result: Any, what: str) -> Any:
    """The driver API's (CUresult, value...): raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        _, text = drv.cuGetErrorString(err)
        raise MachineError(f"{what} failed: {err!r} ({(text or b'').decode(errors='replace')})")
    return values[0] if len(values) == 1 else (tuple(values) or None)
