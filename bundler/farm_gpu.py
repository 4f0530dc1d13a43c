"""The GPU work of a farm job, behind the ``FarmGpu`` seam: the weightless build and the EAGER warm-up.

``ShimGpu`` does it through the shim (runtime_shim.trt, runtime_shim.session); tests replace it with a fake, so
the job's bookkeeping (bundler/farm.py) is tested on machines without a GPU. ``overlay_bundle`` makes the
throw-away one-model bundle each warm-up loads.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from runtime_shim.errors import BundleError
from runtime_shim.fsutil import atomic_write
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest, Engine, Manifest, read_bundle_manifest

from .part import WarmupRun


class FarmGpu(Protocol):
    """The GPU work of a farm job: the only seam tests replace (with a fake named as such)."""

    def build_weightless(self, bundle_dir: Path, manifest: Manifest, workdir: Path) -> bytes:
        """A STRIP_PLAN + REFIT_IDENTICAL engine for the current GPU (``ComputeCapability.CURRENT``)."""

    def warm(
        self, bundle_dir: Path, engine_sha256: str, runs: Sequence[WarmupRun], rounds: int, workdir: Path
    ) -> tuple[bytes, tuple[WarmupRun, ...], Mapping[str, float]]:
        """Load ``bundle_dir`` through the shim (EAGER), run every warm-up ``rounds`` times with the engine
        whose sha256 is given, and return (serialized runtime cache, runs with timings, timings)."""


class ShimGpu:
    """The real GPU work, through the shim: runs only on a GPU TensorRT for RTX supports (tests: rtx_gpu marker)."""

    def build_weightless(self, bundle_dir: Path, manifest: Manifest, workdir: Path) -> bytes:
        from runtime_shim.fallback import model_on_disk
        from runtime_shim.trt.build import BuildRequest, build_engine
        from runtime_shim.user_cache import UserCache

        # The skeleton plus the unpacked weight store is the normalized model `build` makes engines from, so the
        # engine's refit names are the weight store's names.
        with model_on_disk(manifest, bundle_dir, UserCache("trtx-farm", workdir / "user-cache")) as onnx_path:
            profiles = [p.triples() for p in manifest.profiles]
            source = str(bundle_dir / manifest.skeleton.file.path)  # errors name the bundle, not the temp copy
            return build_engine(
                BuildRequest(onnx_path=str(onnx_path), profiles=profiles, weightless=True, source=source)
            )

    def warm(
        self, bundle_dir: Path, engine_sha256: str, runs: Sequence[WarmupRun], rounds: int, workdir: Path
    ) -> tuple[bytes, tuple[WarmupRun, ...], Mapping[str, float]]:
        import numpy as np

        from runtime_shim.session import load
        from runtime_shim.store.reader import numpy_dtype

        t0 = time.perf_counter()
        (model,) = read_bundle_manifest(bundle_dir)[0].names  # the overlay: one model (overlay_bundle)
        # A private cache dir: the job starts from an empty runtime cache, not from whatever this runner kept.
        session = load(
            bundle_dir,
            app="trtx-farm",
            model=model,
            cache_dir=workdir / "user-cache",
            specialization="eager",
            fallback="error",
            device=0,
        )
        timings = {"load_s": time.perf_counter() - t0}
        try:
            if session.engine is None or session.engine.file.sha256 != engine_sha256:
                raise BundleError(
                    f"the shim loaded {session.report.engine} instead of the farm's engine {engine_sha256}",
                    hint="run 'trtx-bundle doctor' on this runner to see why the engine was passed over",
                )
            done = []
            t0 = time.perf_counter()
            for run in runs:
                inputs = {
                    t.name: np.zeros(run.shapes[t.name], dtype=numpy_dtype(t.dtype)) for t in session.manifest.inputs
                }
                first = None
                for i in range(rounds):
                    t = time.perf_counter()
                    # Every profile gets its own kernels in the cache, so each run names the profile it warms.
                    session.run(inputs, profile=run.profile)
                    first = time.perf_counter() - t if i == 0 else first
                done.append(WarmupRun(profile=run.profile, shapes=run.shapes, first_run_s=first, rounds=rounds))
            timings["warmup_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            blob = session.serialize_cache() or b""
            timings["serialize_s"] = time.perf_counter() - t0
        finally:
            session.close()
        return blob, tuple(done), timings


def overlay_bundle(
    bundle_dir: Path, manifest: Manifest, dest: Path, new_engine: Engine | None, engine_bytes: bytes, engine_sha: str
) -> Path:
    """A throw-away bundle of this one model with only the farm's engine and no runtime cache, so the shim must
    load that engine and start from an empty cache. The other models of the bundle are left out: the warm-up
    runs this model alone, and a one-model bundle loads without naming it. Files are linked, not copied, where
    the file system allows."""
    dest.mkdir(parents=True)
    # A farm that built no engine loads one the bundle already has, so one of the two lists is never empty.
    engines = [e for e in manifest.engines if e.file.sha256 == engine_sha] or [
        e for e in (new_engine,) if e is not None
    ]
    model = replace(manifest.as_model(), engines=tuple(engines), runtime_caches=())
    whole = manifest.whole()
    overlay = BundleManifest(trt_rtx=whole.trt_rtx, weights=whole.weights, models=(model,), creator=whole.creator)
    for _where, ref in overlay.files():
        target = dest / ref.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if new_engine is not None and ref.sha256 == engine_sha:
            target.write_bytes(engine_bytes)  # private temp dir: nobody reads it before the job does
            continue
        try:
            os.link(bundle_dir / ref.path, target)
        except OSError:
            shutil.copyfile(bundle_dir / ref.path, target)
    atomic_write(dest / MANIFEST_NAME, overlay.to_json())
    return dest
