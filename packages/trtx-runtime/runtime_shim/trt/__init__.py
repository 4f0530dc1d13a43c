"""The only code of the shim that calls TensorRT for RTX: engine builds (build.py) and the GPU runtime (runtime.py)."""
