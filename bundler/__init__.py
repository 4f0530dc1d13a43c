"""trtx-bundler: turns ONNX models into bundles for TensorRT for RTX (the release-engineer side)."""

from runtime_shim import __version__

__all__ = ["__version__"]
