"""The runtime shim embedded in shipped apps: pick, verify, refit and load a bundle's engine on this machine.

The public API is ``__all__``; everything else is internal and may change between releases. ``import runtime_shim``
stays light: the error classes are plain Python, ``load``, ``Session``, ``Report``, the probe and the cache clearing
are imported on first use, and tensorrt_rtx only when a TRT-RTX session is actually opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ArchiveError,
    BackendUnavailableError,
    BundleError,
    CacheError,
    DeltaError,
    EngineBuildError,
    InputError,
    IntegrityError,
    MachineError,
    ManifestError,
    ModelChoiceError,
    ModelError,
    SchemaVersionError,
    SignatureError,
)

__version__ = "0.1.0"
__all__ = [
    # loading and running
    "load",
    "Loader",
    "Session",
    "Report",
    # the machine report
    "probe",
    "Machine",
    "Gpu",
    # the per-user cache
    "clear_cache",
    # updates (trtx-bundle diff makes them)
    "apply_update",
    # errors
    "BundleError",
    "ManifestError",
    "SchemaVersionError",
    "IntegrityError",
    "ModelError",
    "ModelChoiceError",
    "EngineBuildError",
    "ArchiveError",
    "MachineError",
    "InputError",
    "BackendUnavailableError",
    "CacheError",
    "SignatureError",
    "DeltaError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from .delta import apply_update
    from .machine import Gpu, Machine, probe
    from .report import Report
    from .session import Loader, Session, load
    from .user_cache import clear_cache

_LAZY = {
    "load": "session",
    "Loader": "session",
    "Session": "session",
    "Report": "report",
    "probe": "machine",
    "Machine": "machine",
    "Gpu": "machine",
    "clear_cache": "user_cache",
    "apply_update": "delta",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
