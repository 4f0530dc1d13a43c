"""Refit: the weights of the bundle's weight store set into a weightless TRT-RTX engine, every one, checked first.

Every name the engine asks for (``get_all_weights()``) must be in the weight store with the dtype and element count
the engine expects; all of them are checked before anything is uploaded or set, so a mismatch costs no GPU memory and
leaves no partial refit. The weights go to the GPU through gpu/upload.py's pinned-ring pipeline and are set from
device pointers, or are set from host memory where asked or where that upload fails.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import IntegrityError, MachineError
from .manifest import Manifest
from .store.format import HINT_CORRUPT, nbytes_for

if TYPE_CHECKING:  # pragma: no cover
    from .trt.runtime import DeviceUpload, TrtRuntime, WeightUploader

log = logging.getLogger(__name__)


class WeightSource(Protocol):
    """The weight store as the refit sees it (names are ONNX initializer names)."""

    def spec(self, name: str) -> tuple[str, int]: ...  # (dtype name, element count); KeyError if absent
    def read(self, name: str) -> np.ndarray: ...  # raw little-endian bytes in any numpy view
    # Every blob the names need, once (identical tensors share one pointer), through an uploader opened with
    # open_uploader(slot_bytes=..., threads=...): gpu_upload's pipeline, not one synchronous copy per tensor.
    def upload(self, names: Sequence[str], open_uploader: Callable[..., WeightUploader]) -> DeviceUpload: ...


class StoreWeights:
    """The weight store as a TRT-RTX refit source: names and sizes from the manifest, bytes from the reader.

    Every frame is hashed as it is read, on every load, into memory of this process: what is decoded and handed to
    TRT-RTX is what was hashed, whatever happens to the file meanwhile (docs/WEIGHT_STORE.md, "Verification").
    Host-memory reads go through shared_weights.py (a blob another session of this process holds is not read again);
    the GPU upload (``upload``) decodes into its own staging memory, per session.
    """

    def __init__(self, manifest: Manifest, bundle_dir: Path) -> None:
        from .store.reader import WeightReader

        self.store = manifest.weights
        # how the weights were checked, for the load report
        self.check = f"every frame's {manifest.weights.frame_digest} checked as it was read"
        self.reader = WeightReader(bundle_dir, manifest.weights)
        self.decoded_on: str | None = None
        self.decode_why: str | None = None

    def spec(self, name: str) -> tuple[str, int]:
        t = self.store.tensor(name)  # KeyError when absent
        return t.dtype, math.prod(t.shape)  # Python ints: no overflow, whatever the manifest says

    def read(self, name: str) -> np.ndarray:
        """The tensor, read-only, over this process's one copy of its blob (shared_weights.py): tensors with identical
        bytes, and sessions of other models of the bundle that hold the blob meanwhile, share it."""
        from .shared_weights import shared_blobs
        from .store.reader import shaped

        t = self.store.tensor(name)
        return shaped(shared_blobs(self.reader, [t.blob])[t.blob], t.dtype, t.shape)

    def upload(self, names: Sequence[str], open_uploader: Callable[..., Any]) -> Any:
        from .gpu.upload import SLOT_BYTES

        indices = sorted({self.store.tensor(n).blob for n in names})  # a blob shared by identical tensors goes up once
        # A slot holds one frame at least (stores written with bigger frames get bigger slots) and no more than the
        # whole upload: a small model does not pin threads x 4 MiB.
        largest = max((max(f.raw_size, f.size) for i in indices for f in self.store.blobs[i].frames), default=1)
        total = sum(self.store.blobs[i].nbytes for i in indices)
        with open_uploader(slot_bytes=max(largest, min(SLOT_BYTES, total)), threads=self.reader.threads) as up:
            uploaded = up.upload(self.reader, indices)
            # where the frames were decoded, and why not on the GPU when they were not (the load report shows it)
            self.decoded_on = getattr(up, "decoded_on", None)
            self.decode_why = getattr(up, "decode_why", None)
        return uploaded

    def close(self) -> None:
        self.reader.close()


@dataclass
class Refit:
    """What a refit did: the weights set, from where ("device" | "host"; None: nothing to refit), notes, timings."""

    names: list[str] = field(default_factory=list)
    source: str | None = None
    notes: list[str] = field(default_factory=list)  # for the load report (e.g. why host memory was used)
    timings: dict[str, float] = field(default_factory=dict)


def refit_engine(
    runtime: TrtRuntime, engine: Any, weights: WeightSource, *, on_device: bool | None, source: str
) -> Refit:
    """Refit every weight the engine names. ``on_device``: True device pointers only, False host arrays, None device
    pointers, or host arrays where the upload fails (e.g. no GPU memory for a second copy of the weights)."""
    done = Refit()
    names = list(runtime.refittable_weights(engine))
    specs = _check_specs(runtime, engine, weights, names, source)
    if not names:
        return done
    if on_device is not False:
        t0 = time.perf_counter()
        try:
            upload = weights.upload(names, runtime.open_uploader)
            done.timings["weights_upload_s"] = time.perf_counter() - t0
        except MachineError as e:
            if on_device:
                raise
            done.notes.append(f"weights refit from host memory: the upload to the GPU failed ({e})")
            log.warning("%s: %s", source, done.notes[-1])
        else:
            try:
                done.names = _set_all(
                    runtime,
                    engine,
                    names,
                    specs,
                    lambda n, d, c: runtime.set_device_weights(engine, n, d, c, _device_ptr(upload, n, d, c, source)),
                    source,
                )
            finally:
                upload.free()  # TRT-RTX may read the pointers until refit_cuda_engine() returns (its docstring), no longer
            done.source = "device"
            return done
    done.names = _set_all(
        runtime,
        engine,
        names,
        specs,
        lambda n, d, c: runtime.set_weights(engine, n, d, c, _host_array(weights, n, d, c, source)),
        source,
    )
    done.source = "host"
    return done


# TRT-RTX reads dtype x count elements from whatever pointer it is given: every buffer is sized against that first,
# so a short one (an index the manifest check missed, a decoder or uploader fault) is an error, never an overread.
def _size_fault(source: str, name: str, dtype: str, count: int, have: int) -> IntegrityError:
    return IntegrityError(
        f"{source}: weight {name!r}: {dtype} x {count} needs {nbytes_for(dtype, (count,))} bytes, "
        f"the buffer to refit from has {have}",
        hint=HINT_CORRUPT,
    )


def _host_array(weights: WeightSource, name: str, dtype: str, count: int, source: str) -> np.ndarray:
    array = np.ascontiguousarray(weights.read(name))
    if array.nbytes != nbytes_for(dtype, (count,)):
        raise _size_fault(source, name, dtype, count, array.nbytes)
    return array


def _device_ptr(upload: DeviceUpload, name: str, dtype: str, count: int, source: str) -> int:
    tensor = upload.tensors.get(name)
    have = -1 if tensor is None else int(getattr(tensor, "nbytes", -1))
    if tensor is None or have != nbytes_for(dtype, (count,)) or (have and not tensor.ptr):
        raise _size_fault(source, name, dtype, count, max(have, 0))
    return int(tensor.ptr)


def _check_specs(
    runtime: TrtRuntime, engine: Any, weights: WeightSource, names: list[str], source: str
) -> dict[str, tuple[str, int]]:
    # Every name is checked before anything is uploaded or set: a mismatch costs no GPU memory, leaves no partial refit.
    specs: dict[str, tuple[str, int]] = {}
    for name in names:
        want_dtype, want_count = runtime.weight_prototype(engine, name)
        try:
            dtype, count = weights.spec(name)
        except KeyError:
            raise IntegrityError(
                f"{source}: the engine asks for weight {name!r}, which the bundle's weight store lacks",
                hint="the engine and the weight store come from different models; rebuild the bundle",
            ) from None
        if dtype != want_dtype or count != want_count:
            raise IntegrityError(
                f"{source}: weight {name!r}: the engine expects {want_dtype} x {want_count}, the weight "
                f"store has {dtype} x {count}",
                hint="rebuild the bundle from one model",
            )
        specs[name] = (dtype, count)
    return specs


def _set_all(
    runtime: TrtRuntime,
    engine: Any,
    names: list[str],
    specs: Mapping[str, tuple[str, int]],
    set_one: Callable[[str, str, int], bool],
    source: str,
) -> list[str]:
    done: list[str] = []
    for name in names:
        if not set_one(name, *specs[name]):
            raise MachineError(f"{source}: TensorRT for RTX rejected weight {name!r}")
        done.append(name)
    # get_missing_weights() has been seen to come back empty with a weight never set: check ourselves.
    if set(done) != set(names):
        raise MachineError(f"{source}: weights left unset: {sorted(set(names) - set(done))}")
    if not runtime.refit(engine):
        raise MachineError(f"{source}: TensorRT for RTX refused the refit", hint="run with -vv to see TRT-RTX's log")
    return done
