"""The runtime shim embedded in shipped apps: pick, verify, refit and load a bundle's engine on this machine.

``import runtime_shim`` stays light: ``load``, ``Session`` and ``probe`` are imported on first use, and
tensorrt_rtx only when a TRT-RTX session is actually opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "Session", "probe", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .machine import probe
    from .session import Session, load

_LAZY = {"load": "session", "Session": "session", "probe": "machine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
