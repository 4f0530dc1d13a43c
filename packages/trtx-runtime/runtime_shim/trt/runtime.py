"""The TRT-RTX GPU runtime behind the TrtRuntime seam: validity, deserialize, set weights, context, cache, execution.

Written to NVIDIA's documented TRT-RTX 1.7 Python API (see ../shared/TRT_RTX_NOTES.md); runs only on a GPU that
TRT-RTX supports. `tensorrt_rtx` and cuda-python are imported lazily. The load sequence over this seam (and the
refit it runs) is trt/session.py and refit.py; a recording fake stands in for this module in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import BundleError, MachineError
from ..gpu.cuda import check, cudart
from .build import make_logger, trt

log = logging.getLogger(__name__)

SPECIALIZATIONS = {"lazy": "LAZY", "eager": "EAGER", "none": "NONE"}
# EngineInvalidityDiagnostics bits, in words a user can act on.
DIAGNOSTICS = {
    1: ("VERSION_MISMATCH", "the engine was built by another TensorRT for RTX version"),
    2: ("UNSUPPORTED_CC", "the engine does not support this GPU's compute capability (or TRT-RTX does not)"),
    4: ("OLD_CUDA_DRIVER", "the NVIDIA driver is too old for this engine"),
    8: ("OLD_CUDA_RUNTIME", "the CUDA runtime is too old for this engine"),
    16: ("INSUFFICIENT_GPU_MEMORY", "the GPU does not have enough free memory"),
    32: ("MALFORMED_ENGINE", "the engine file is malformed"),
    64: ("CUDA_ERROR", "a CUDA error occurred while checking"),
}
# our dtype names <-> TRT DataType member names
_DTYPES = {
    "float32": "FLOAT",
    "float16": "HALF",
    "bfloat16": "BF16",
    "int8": "INT8",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "uint8": "UINT8",
    "float8e4m3fn": "FP8",
    "int4": "INT4",
}
_MAX_SHAPE_SETS = 8  # device buffer sets kept per context (one per input-shape signature)


def decode_diagnostics(bits: int) -> list[str]:
    words = [f"{name}: {text}" for bit, (name, text) in DIAGNOSTICS.items() if bits & bit]
    unknown = bits & ~sum(DIAGNOSTICS)
    return words + ([f"unknown diagnostics bits 0x{unknown:x}"] if unknown else [])


class DeviceUpload(Protocol):
    """Weights already on the GPU (gpu_upload.DeviceWeights): ``tensors[name].ptr`` per name; free() releases them."""

    @property
    def tensors(self) -> Mapping[str, Any]: ...

    def free(self) -> None: ...


class WeightUploader(Protocol):
    """gpu_upload.Uploader as the refit uses it: one upload, then close() (also as a with-block)."""

    def upload(self, reader: Any, indices: Iterable[int] | None = None) -> DeviceUpload: ...
    def close(self) -> None: ...
    def __enter__(self) -> WeightUploader: ...
    def __exit__(self, *exc: object) -> None: ...


class TrtRuntime(Protocol):
    """The seam between the load sequence (TrtSession) and TRT-RTX + CUDA; a recording fake stands in for tests."""

    def engine_validity(self, header: bytes) -> tuple[str, int]: ...  # ("VALID"|"SUBOPTIMAL"|"INVALID", bits)
    def deserialize(self, plan: bytes) -> Any: ...  # engine handle, or None
    def refittable_weights(self, engine: Any) -> list[str]: ...
    def weight_prototype(self, engine: Any, name: str) -> tuple[str, int]: ...  # (our dtype name, element count)
    def set_weights(self, engine: Any, name: str, dtype: str, count: int, array: np.ndarray) -> bool: ...  # host memory
    def set_device_weights(
        self, engine: Any, name: str, dtype: str, count: int, ptr: int
    ) -> bool: ...  # TensorLocation.DEVICE
    def open_uploader(
        self, *, slot_bytes: int, threads: int
    ) -> WeightUploader: ...  # pinned ring on this runtime's GPU
    def refit(self, engine: Any) -> bool: ...
    def create_context(
        self, engine: Any, *, specialization: str, cuda_graphs: bool, caches: Sequence[bytes]
    ) -> tuple[Any, int | None]: ...
    def execute(self, context: Any, inputs: Mapping[str, np.ndarray], profile: int) -> dict[str, np.ndarray]: ...
    def serialize_cache(self, context: Any) -> bytes: ...
    def release(self, context: Any, engine: Any) -> None: ...


class _Context:
    def __init__(self, ctx: Any, config: Any, cache: Any, stream: int) -> None:
        self.ctx, self.config, self.cache, self.stream = ctx, config, cache, stream
        self.buffers: dict[tuple, dict[str, tuple[int, int]]] = {}  # shape signature -> name -> (device ptr, bytes)
        self.profile = 0  # the optimization profile the context runs under (0 on creation)


class TrtRtxRuntime:
    """The real TrtRuntime: tensorrt_rtx for the engine, cuda.bindings.runtime for device memory and streams."""

    def __init__(self, device: int = 0) -> None:
        self.t, self.cu, self.device = trt(), cudart(), device
        check(self.cu, self.cu.cudaSetDevice(device), "cudaSetDevice")
        check(
            self.cu, self.cu.cudaFree(0), "cudaFree(0)"
        )  # makes the primary context current: cache (de)serialize needs one
        self.logger = make_logger()  # keeps errors for the messages below
        self.rt = self.t.Runtime(self.logger)
        self._refitters: dict[int, Any] = {}
        self._keep: list[np.ndarray] = []  # host arrays that must outlive refit_cuda_engine()

    def engine_validity(self, header: bytes) -> tuple[str, int]:
        validity, bits = self.rt.get_engine_validity(header)
        return validity.name, int(bits)

    def deserialize(self, plan: bytes) -> Any:
        return self.rt.deserialize_cuda_engine(plan)

    def _refitter(self, engine: Any) -> Any:
        return self._refitters.setdefault(id(engine), self.t.Refitter(engine, self.logger))

    def refittable_weights(self, engine: Any) -> list[str]:
        return list(self._refitter(engine).get_all_weights()) if engine.refittable else []

    def weight_prototype(self, engine: Any, name: str) -> tuple[str, int]:
        proto = self._refitter(engine).get_weights_prototype(name)
        by_trt = {v: k for k, v in _DTYPES.items()}
        return by_trt.get(proto.dtype.name, proto.dtype.name), int(proto.size)

    def _trt_dtype(self, name: str, dtype_name: str) -> Any:
        if dtype_name not in _DTYPES:
            raise BundleError(f"weight {name!r}: dtype {dtype_name} cannot be refit into a TRT-RTX engine")
        return getattr(self.t.DataType, _DTYPES[dtype_name])

    def set_weights(self, engine: Any, name: str, dtype_name: str, count: int, array: np.ndarray) -> bool:
        self._keep.append(array)
        w = self.t.Weights(self._trt_dtype(name, dtype_name), array.ctypes.data, count)
        return bool(self._refitter(engine).set_named_weights(name, w))

    def set_device_weights(self, engine: Any, name: str, dtype_name: str, count: int, ptr: int) -> bool:
        w = self.t.Weights(self._trt_dtype(name, dtype_name), int(ptr), count)
        return bool(self._refitter(engine).set_named_weights(name, w, self.t.TensorLocation.DEVICE))

    def open_uploader(self, *, slot_bytes: int, threads: int) -> WeightUploader:
        from ..gpu.upload import Uploader

        return Uploader(device=self.device, slot_bytes=slot_bytes, threads=threads)

    def refit(self, engine: Any) -> bool:
        refitter = self._refitter(engine)
        try:
            missing = refitter.get_missing_weights()
            if missing:
                log.error("TRT-RTX reports weights still missing: %s", list(missing))
                return False
            return bool(refitter.refit_cuda_engine())
        finally:
            self._keep.clear()

    def create_context(
        self, engine: Any, *, specialization: str, cuda_graphs: bool, caches: Sequence[bytes]
    ) -> tuple[Any, int | None]:
        t = self.t
        config = engine.create_runtime_config()
        config.dynamic_shapes_kernel_specialization_strategy = getattr(
            t.DynamicShapesKernelSpecializationStrategy, SPECIALIZATIONS[specialization]
        )
        if cuda_graphs:
            config.cuda_graph_strategy = t.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        cache = config.create_runtime_cache()
        loaded = None
        for i, blob in enumerate(caches):
            if cache.deserialize(blob):
                loaded = i
                break
            log.info(
                "runtime cache %d of %d rejected by TRT-RTX (another GPU, driver or version): trying the next",
                i + 1,
                len(caches),
            )
        config.set_runtime_cache(cache)
        ctx = engine.create_execution_context(config)
        if ctx is None:
            raise MachineError(
                "TensorRT for RTX could not create an execution context: " + "; ".join(self.logger.errors[-3:])
            )
        # Graph capture cannot use the legacy default stream.
        stream = check(
            self.cu, self.cu.cudaStreamCreateWithFlags(self.cu.cudaStreamNonBlocking), "cudaStreamCreateWithFlags"
        )
        return _Context(ctx, config, cache, stream), loaded

    def execute(self, context: Any, inputs: Mapping[str, np.ndarray], profile: int = 0) -> dict[str, np.ndarray]:
        c, cu = context, self.cu
        engine = c.ctx.engine
        if profile != c.profile:
            if not c.ctx.set_optimization_profile_async(profile, int(c.stream)):
                raise MachineError(f"TensorRT for RTX refused optimization profile {profile}")
            c.profile = profile
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outs = [n for n in names if engine.get_tensor_mode(n) == self.t.TensorIOMode.OUTPUT]
        for name, array in inputs.items():
            if not c.ctx.set_input_shape(name, tuple(array.shape)):
                raise MachineError(f"TensorRT for RTX refused input {name!r} of shape {tuple(array.shape)}")
        shapes = {n: tuple(c.ctx.get_tensor_shape(n)) for n in outs}
        if any(d < 0 for s in shapes.values() for d in s):
            raise BundleError(f"outputs with data-dependent shapes are not supported by this shim: {shapes}")
        signature = (profile,) + tuple(sorted((n, tuple(a.shape)) for n, a in inputs.items()))
        if signature not in c.buffers:  # stable addresses per shape let CUDA graphs replay instead of re-capturing
            if len(c.buffers) >= _MAX_SHAPE_SETS:
                self._free(c.buffers.pop(next(iter(c.buffers))))
            sizes = {n: a.nbytes for n, a in inputs.items()}
            sizes.update(
                {n: int(np.prod(s)) * _np_dtype(engine.get_tensor_dtype(n).name).itemsize for n, s in shapes.items()}
            )
            c.buffers[signature] = {n: (check(cu, cu.cudaMalloc(max(b, 1)), "cudaMalloc"), b) for n, b in sizes.items()}
        bufs = c.buffers[signature]
        results = {n: np.empty(shapes[n], dtype=_np_dtype(engine.get_tensor_dtype(n).name)) for n in outs}
        for name, (ptr, _) in bufs.items():
            c.ctx.set_tensor_address(name, int(ptr))
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        held = {n: np.ascontiguousarray(a) for n, a in inputs.items()}
        for name, array in held.items():
            check(
                cu, cu.cudaMemcpyAsync(bufs[name][0], array.ctypes.data, array.nbytes, h2d, c.stream), "cudaMemcpyAsync"
            )
        if not c.ctx.execute_async_v3(int(c.stream)):
            raise MachineError("TensorRT for RTX failed to execute: " + "; ".join(self.logger.errors[-3:]))
        for name, out in results.items():
            check(cu, cu.cudaMemcpyAsync(out.ctypes.data, bufs[name][0], out.nbytes, d2h, c.stream), "cudaMemcpyAsync")
        check(cu, cu.cudaStreamSynchronize(c.stream), "cudaStreamSynchronize")
        return results

    def serialize_cache(self, context: Any) -> bytes:
        return bytes(memoryview(context.cache.serialize()))

    def _free(self, bufs: Mapping[str, tuple[int, int]]) -> None:
        for ptr, _ in bufs.values():
            self.cu.cudaFree(ptr)

    def release(self, context: Any, engine: Any) -> None:
        self._keep.clear()  # a refit that never ran leaves its host arrays here
        if context is not None:
            self.cu.cudaStreamSynchronize(context.stream)
            for bufs in context.buffers.values():
                self._free(bufs)
            self.cu.cudaStreamDestroy(context.stream)
            context.ctx = context.cache = context.config = None
        self._refitters.pop(id(engine), None)


def _np_dtype(trt_name: str) -> np.dtype:
    by_trt = {v: k for k, v in _DTYPES.items() if k not in ("bfloat16", "float8e4m3fn", "int4")}
    if trt_name not in by_trt:
        raise BundleError(f"I/O tensors of TRT type {trt_name} are not supported by this shim's run()")
    return np.dtype(by_trt[trt_name])
