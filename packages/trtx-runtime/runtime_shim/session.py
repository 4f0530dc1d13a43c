"""``load()`` and ``Session``: the load as the sequence of steps in DESIGN.md ("Runtime shim"), one module per step.

1. read and validate the manifest, 2. probe the machine, 3-4. rank engines and runtime caches (select.py);
5-7. verify, refit and configure the first engine TRT-RTX opens, else ONNX Runtime (backend.py, refit.py, trt/);
8. save the runtime cache on close(), at interpreter exit and on request (Session, user_cache.py).
The report (report.py) says what was chosen and why, and above all why TRT-RTX was not used when it was not.
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import LoadOptions, TrtRuntimeFactory, open_backend, real_trt_runtime
from .cache_key import model_id
from .errors import BundleError, SignatureError
from .inputs import validate_inputs
from .machine import Machine
from .machine import probe as real_probe
from .manifest import MANIFEST_NAME, CacheKey, Engine, Manifest, read_bundle_manifest
from .report import Report
from .select import Plan, plan_for
from .select import plan as plan  # where doctor and older callers import it from
from .signing import TrustedKey, check_signature
from .user_cache import UserCache

if TYPE_CHECKING:  # pragma: no cover
    from .trt.runtime import TrtRuntime

log = logging.getLogger(__name__)

_OPEN: weakref.WeakSet[Session] = weakref.WeakSet()


class Loader:
    """load() with its two seams given: ``probe()`` describes the machine, ``trt_runtime(device)`` opens TRT-RTX.

    ``load()`` is ``Loader().load()``: the real probe and TensorRT for RTX. Tests pass a probe that returns a fixed
    Machine and a factory that returns a fake of the TRT-RTX runtime (trt/runtime.py's TrtRuntime seam).
    """

    def __init__(
        self,
        *,
        probe: Callable[[], Machine] | None = None,
        trt_runtime: Callable[[int], TrtRuntime] | None = None,
    ) -> None:
        self.probe: Callable[[], Machine] = probe or real_probe
        self.trt_runtime: TrtRuntimeFactory = trt_runtime or real_trt_runtime

    def load(
        self,
        bundle_path: str | Path,
        app: str = "MyApp",
        *,
        cache_dir: str | Path | None = None,
        specialization: str = "lazy",
        cuda_graphs: bool = True,
        fallback: str = "onnxruntime",
        device: int | None = None,
        weights_on_device: bool | None = None,
        verify_weights: str = "always",
        trusted_keys: Sequence[TrustedKey] | None = None,
        model: str | None = None,
    ) -> Session:
        """Open one model of a bundle for inference on this machine (see ``load()``)."""
        options = LoadOptions(
            specialization=specialization,
            cuda_graphs=cuda_graphs,
            fallback=fallback,
            weights_on_device=weights_on_device,
            verify_weights=verify_weights,
        )
        t_start = time.perf_counter()
        bundle_dir = Path(bundle_path)
        source = str(bundle_dir / MANIFEST_NAME)  # what a ModelChoiceError names: the bundle as the app gave it
        user_cache = UserCache(app, cache_dir)
        user_cache.sweep()  # what runs killed mid-write left: a few directory listings when there is none
        if bundle_dir.is_file():  # a .trtx archive: unpacked (and checked) once into the user cache, then reused
            from .archive import unpack_for  # tarfile and its compressors load only for archives

            source = f"{bundle_dir}: {MANIFEST_NAME}"
            bundle_dir = unpack_for(bundle_dir, user_cache)
        # Before anything reads the bundle's files beyond its manifest: with trusted keys, a bundle that is not
        # signed by one of them (or was changed since) goes no further, whichever backend would have run it.
        signature = check_signature(bundle_dir, trusted_keys)
        # Step 1, and the model: with several and none named (or an unknown name), ModelChoiceError lists the names
        # here, before the machine is probed or any other file is read.
        bundle, warnings, manifest_sha256 = read_bundle_manifest(bundle_dir)
        if signature.verified and signature.manifest_sha256 != manifest_sha256:
            # What is parsed must be the very bytes the signature covers: a manifest swapped in after the check is not.
            raise SignatureError(
                f"{bundle_dir / MANIFEST_NAME}: changed between its signature check and its reading "
                f"(sha256 {manifest_sha256}, signed {signature.manifest_sha256})",
                hint="something is writing into the bundle directory while it loads; load it again once it is done",
            )
        manifest = bundle.view(model, source=source)
        p = plan_for(manifest, warnings, manifest_sha256, user_cache, machine=self.probe(), device=device)  # 2-4
        for w in p.warnings:
            log.warning("%s", w)
        report = _first_report(p, bundle_dir, user_cache)
        report.models = list(bundle.names)
        report.signature = signature.to_dict()
        impl, engine = open_backend(p, bundle_dir, user_cache, report, options, self.trt_runtime)  # steps 5-7
        report.timings["load_s"] = time.perf_counter() - t_start
        return Session(manifest=p.manifest, impl=impl, report=report, user_cache=user_cache, key=p.key, engine=engine)


def load(
    bundle_path: str | Path,
    app: str = "MyApp",
    *,
    cache_dir: str | Path | None = None,
    specialization: str = "lazy",
    cuda_graphs: bool = True,
    fallback: str = "onnxruntime",
    device: int | None = None,
    weights_on_device: bool | None = None,
    verify_weights: str = "always",
    trusted_keys: Sequence[TrustedKey] | None = None,
    model: str | None = None,
) -> Session:
    """Open a model of a bundle for inference on this machine: the engine, runtime cache and backend that fit it, or a
    clear error.

    ``bundle_path``: a bundle directory, or a ``.trtx`` archive, unpacked (every file checked) once into the user cache
    dir and reused by later loads (archive.py). ``model``: which model of the bundle to open, by name; it may be left
    out when the bundle holds one model. With several and none named, or a name the bundle lacks, ModelChoiceError
    lists the names as soon as the manifest is read (with ``trusted_keys``, once its signature is checked), before
    the machine is probed or any other file is read. A Session is one model, with its own engine and runtime cache
    (user-cache entries are per model); sessions of models of one bundle in one process read the weight blobs they
    share from disk once and hold one copy of them (shared_weights.py).

    ``app`` names the per-user cache dir (``cache_dir`` or ``$TRTX_CACHE_DIR`` replace it). ``fallback``:
    "onnxruntime" (default) runs on the CPU where TRT-RTX cannot, "error" raises BackendUnavailableError there.
    ``specialization``: dynamic-shape kernels "lazy" (default), "eager" or "none"; ``cuda_graphs`` captures
    whole-graph CUDA graphs. ``device``: the CUDA device (default: the first GPU TRT-RTX supports).

    ``weights_on_device`` (engines refit from the weight store): None (default) streams the weights to the GPU through
    gpu/upload.py's pinned-ring pipeline and refits from device pointers, and refits from host memory only where that
    upload fails (it needs GPU memory for a second copy of the weights during the refit); True: the GPU path or an
    error; False: host memory (every tensor decoded into host RAM, TRT-RTX copies it over).

    ``verify_weights``: every load hashes every frame of the weight file it reads, into this process's memory, before
    decoding it, so what reaches TRT-RTX or ONNX Runtime is what the manifest pins (a blob another live session of
    this process read and checked from the same pinned file is shared with it, read-only). "always" (default) and
    "once" (kept for apps that pass it; it used to skip the hashing on later loads of an unchanged-looking file) are
    the same. Engines and caches are always hashed.

    ``trusted_keys``: PEM public keys (paths or bytes). Given, the bundle must carry a signature (manifest.sig,
    ``trtx-bundle sign``) by one of them over its manifest.json as it is now, or SignatureError is raised before any
    other file of it is read (signing.py; needs the ``signing`` extra). None (default): nothing is checked, and
    ``report.signature`` says whether the bundle is signed.
    """
    return Loader().load(
        bundle_path,
        app,
        cache_dir=cache_dir,
        specialization=specialization,
        cuda_graphs=cuda_graphs,
        fallback=fallback,
        device=device,
        weights_on_device=weights_on_device,
        verify_weights=verify_weights,
        trusted_keys=trusted_keys,
        model=model,
    )


def _first_report(p: Plan, bundle_dir: Path, user_cache: UserCache) -> Report:
    """The report as selection leaves it: the bundle, the machine, the ranked choices, and the manifest's warnings."""
    machine = p.machine.to_dict()
    report = Report(
        bundle=str(bundle_dir),
        model=p.manifest.model.name,
        machine=machine,
        warnings=list(p.warnings),
        gpu=next((g for g in machine["gpus"] if p.gpu and g["index"] == p.gpu.index), None),
        engine_choices=[c.to_dict() for c in p.engines],
        cache_choices=[c.to_dict() for c in p.caches],
        cache_dir=str(user_cache.dir),
    )
    if p.manifest.trt_rtx.version != p.machine.trt_rtx_version and p.machine.trt_rtx_version:
        report.warnings.append(
            f"the bundle was made for TensorRT for RTX {p.manifest.trt_rtx.version}, "
            f"{p.machine.trt_rtx_version} is installed: its engines and caches cannot be used here"
        )
    return report


class Session:
    """One model of a bundle, loaded: ``run(dict) -> dict``; saves its runtime cache on close(), at exit, on request."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        impl: Any,
        report: Report,
        user_cache: UserCache,
        key: CacheKey | None,
        engine: Engine | None,
    ) -> None:
        self.manifest, self.report, self.user_cache, self._impl, self._key = manifest, report, user_cache, impl, key
        self.engine = engine  # the bundle's Engine that runs (None: built here, or ONNX Runtime)
        self.closed = False
        _OPEN.add(self)

    @property
    def backend(self) -> str:
        return self.report.backend

    @property
    def model(self) -> str:
        """The name of the bundle's model this session runs."""
        return self.manifest.model.name

    def run(self, inputs: Mapping[str, np.ndarray], profile: int | None = None) -> dict[str, np.ndarray]:
        """Run once. ``profile`` picks the optimization profile (default: the first that holds the shapes)."""
        if self.closed:
            raise BundleError("run() on a closed session", hint="load() the bundle again")
        return self._impl.run(inputs, validate_inputs(self.manifest, inputs, profile))

    def serialize_cache(self) -> bytes | None:
        """The TRT-RTX runtime cache as it is now (None on ONNX Runtime)."""
        if self.backend != "tensorrt_rtx" or self._impl is None:
            return None
        return self._impl.serialize_cache()

    def save_cache(self) -> bool:
        """Save the runtime cache to the user cache dir. Never raises: failures are logged and False returned."""
        if self.backend != "tensorrt_rtx" or self._key is None or self._impl is None:
            return False
        try:
            data = self.serialize_cache()
        except Exception as e:
            log.warning("runtime cache not saved: serializing it failed (%s)", e)
            return False
        if not data:
            return False
        return self.user_cache.save_runtime_cache(model_id(self.manifest), self._key, data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.save_cache()
        finally:
            _OPEN.discard(self)
            impl, self._impl = self._impl, None
            if impl is not None:
                impl.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _save_open_sessions() -> None:
    # Apps that never call close() still keep their warm cache; save only, TRT-RTX tears itself down.
    for s in list(_OPEN):
        if not s.closed:
            s.save_cache()
