"""One engine opened through the TrtRuntime seam: header validity, deserialize, refit, runtime config + caches, run.

The steps run in this order for every engine load() tries; any failure releases what was made so far, so that the
next candidate starts clean. The seam is trt/runtime.py (TRT-RTX itself) or, in tests, a recording fake.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import BundleError, MachineError
from ..refit import WeightSource, refit_engine
from .runtime import SPECIALIZATIONS, TrtRuntime, decode_diagnostics

log = logging.getLogger(__name__)


class TrtSession:
    """The load sequence: header validity, deserialize, refit every weight, runtime config + cache, execute."""

    def __init__(
        self,
        runtime: TrtRuntime,
        plan: bytes,
        *,
        weights: WeightSource | None,
        specialization: str = "lazy",
        cuda_graphs: bool = True,
        caches: Sequence[bytes] = (),
        weights_on_device: bool | None = None,
        source: str = "engine",
    ) -> None:
        if specialization not in SPECIALIZATIONS:
            raise BundleError(f"specialization: expected one of {', '.join(SPECIALIZATIONS)}, got {specialization!r}")
        self.runtime, self.source = runtime, source
        self.timings: dict[str, float] = {}
        self.refit_from: str | None = None  # "device" | "host" once refit; None: nothing was refit
        self.refitted: list[str] = []  # the weights set by the refit
        self.notes: list[str] = []  # for the caller's report (e.g. why the refit went through host memory)
        self.validity, bits = runtime.engine_validity(bytes(plan[:64]))
        if self.validity == "INVALID":
            words = decode_diagnostics(bits) or ["TRT-RTX gave no reason (is an NVIDIA driver present?)"]
            raise MachineError(f"{source}: TensorRT for RTX says this engine cannot run here: " + "; ".join(words))
        if self.validity == "SUBOPTIMAL":
            log.warning(
                "%s: TensorRT for RTX says this engine may run slower here: %s",
                source,
                "; ".join(decode_diagnostics(bits)),
            )
        t0 = time.perf_counter()
        self.context: Any = None
        self.engine = runtime.deserialize(plan)
        if self.engine is None:
            raise MachineError(
                f"{source}: TensorRT for RTX could not deserialize the engine", hint="run with -vv to see TRT-RTX's log"
            )
        self.timings["deserialize_s"] = time.perf_counter() - t0
        try:
            if weights is not None:
                t0 = time.perf_counter()
                done = refit_engine(runtime, self.engine, weights, on_device=weights_on_device, source=source)
                self.refitted, self.refit_from = done.names, done.source
                self.notes += done.notes
                self.timings.update(done.timings)
                self.timings["refit_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self.context, self.cache_loaded = runtime.create_context(
                self.engine, specialization=specialization, cuda_graphs=cuda_graphs, caches=list(caches)
            )
            self.timings["context_s"] = time.perf_counter() - t0
        except BaseException:
            self.close()  # a half-loaded engine must not keep GPU memory while the caller tries the next one
            raise

    def run(self, inputs: Mapping[str, np.ndarray], profile: int = 0) -> dict[str, np.ndarray]:
        return self.runtime.execute(self.context, inputs, profile)

    def serialize_cache(self) -> bytes:
        return self.runtime.serialize_cache(self.context)

    def close(self) -> None:
        if self.context is not None or self.engine is not None:
            self.runtime.release(self.context, self.engine)
        self.context = self.engine = None
