"""Refit: the weights of the bundle's weight store set into a weightless TRT-RTX engine, every one, checked first.

Every name the engine asks for (``get_all_weights()``) must be in the weight store with the dtype and element count
the engine expects; all of them are checked before anything is uploaded or set, so a mismatch costs no GPU memory and
leaves no partial refit. The weights go to the GPU through gpu/upload.py's pinned-ring pipeline and are set from
device pointers, or are set from host memory where asked or where that upload fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import IntegrityError, MachineError
from .manifest import Manifest
from .user_cache import UserCache

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
    """The weight store as a TRT-RTX refit source: names and sizes from the manifest, bytes from the reader."""

    def __init__(
        self, manifest: Manifest, bundle_dir: Path, user_cache: UserCache, verify: str, manifest_sha256: str
    ) -> None:
        from .store.reader import WeightReader

        self.store, self.user_cache = manifest.weights, user_cache
        self.path = bundle_dir / manifest.weights.file.path
        self.reader = WeightReader(bundle_dir, manifest.weights)
        # The stamp is checked against the file as opened (fstat), and covers this manifest's frame table: the stamp
        # names the manifest's own sha256 (any change to the manifest means hashing the weights again).
        self.index = manifest_sha256
        self.opened = self.reader.identity()
        self.trusted = verify == "once" and user_cache.is_verified(
            self.path, self.store.file.sha256, index=self.index, stat=self.opened
        )
        self.stamp = verify == "once" and not self.trusted  # stamp the file once a whole upload has hashed every frame
        self.reader.verify_frames = not self.trusted
        self.decoded_on: str | None = None
        self.decode_why: str | None = None

    @property
    def check(self) -> str:
        """How the weights were checked, for the load report."""
        return (
            "every frame's sha256 checked before (this same file, unchanged since): not hashed again"
            if self.trusted
            else "every frame's sha256 checked as it was read"
        )

    def spec(self, name: str) -> tuple[str, int]:
        t = self.store.tensor(name)  # KeyError when absent
        return t.dtype, int(np.prod(t.shape, dtype=np.int64))

    def read(self, name: str) -> np.ndarray:
        return self.reader.read_tensor(name)

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
        if self.stamp and len(indices) == len(self.store.blobs):  # every frame of the file was just hashed
            self.user_cache.mark_verified(
                self.path, self.store.file.sha256, index=self.index, stat=self.reader.identity(), before=self.opened
            )
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
                    lambda n, d, c: runtime.set_device_weights(engine, n, d, c, upload.tensors[n].ptr),
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
        lambda n, d, c: runtime.set_weights(engine, n, d, c, np.ascontiguousarray(weights.read(n))),
        source,
    )
    done.source = "host"
    return done


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
