"""``load()`` and ``Session``: read the bundle, probe, choose, verify, then run on TRT-RTX or ONNX Runtime.

The report says what was chosen and why (engine, runtime cache, machine, timings), and above all why
TRT-RTX was not used when it was not. Runtime caches are saved on close(), at interpreter exit and on request.
"""

from __future__ import annotations

import atexit
import logging
import re
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, BundleError, InputError, MachineError
from .fallback import OrtSession, materialize_model, read_verified
from .machine import Machine, cache_key_for, probe
from .manifest import CacheKey, Engine, Manifest, read_manifest_sha256
from .select import Choice, choose_caches, choose_engines, pick_gpu, trt_blocker
from .user_cache import UserCache

log = logging.getLogger(__name__)

FALLBACKS = ("onnxruntime", "error")
_OPEN: weakref.WeakSet[Session] = weakref.WeakSet()


@dataclass(kw_only=True)
class Report:
    """What load() chose and why; ``to_dict()`` is JSON-ready, ``lines()`` is for people."""

    bundle: str
    model: str
    backend: str = ""  # "tensorrt_rtx" | "onnxruntime"
    engine: dict[str, Any] | None = None
    runtime_cache: str | None = None  # which cache TRT-RTX accepted, in words
    why_not_trt: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] | None = None
    engine_choices: list[dict[str, Any]] = field(default_factory=list)
    cache_choices: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cache_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"bundle {self.bundle} (model {self.model})", f"backend: {self.backend or 'none'}"]
        if self.gpu:
            out.append(
                f"GPU {self.gpu['index']}: {self.gpu['name']} (SM {self.gpu['sm_text']}, device 0x{self.gpu['pci_device_id']:04x})"
            )
        if self.why_not_trt:
            out.append(f"TensorRT for RTX not used: {self.why_not_trt}")
        if self.engine:
            out.append(f"engine: {self.engine.get('kind')} {self.engine.get('file', '')}")
        out.append(f"runtime cache: {self.runtime_cache or 'none (kernels compiled on first use)'}")
        out += [f"warning: {w}" for w in self.warnings]
        out.append("timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in self.timings.items()))
        return out


def model_id(manifest: Manifest) -> str:
    # Kernels depend on the graph, not on weight values: the skeleton's hash names the cache family.
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", manifest.model.name)[:40] or "model"
    return f"{slug}-{manifest.skeleton.file.sha256[:16]}"


@dataclass(frozen=True)
class Plan:
    """What would run here: the probe, the GPU, and the ranked choices (used by load() and by doctor)."""

    manifest: Manifest
    warnings: list[str]
    machine: Machine
    gpu: Any
    key: CacheKey | None
    blocker: str | None
    engines: list[Choice]
    caches: list[Choice]
    manifest_sha256: str = ""  # of the manifest bytes parsed


def plan(
    bundle_path: str | Path, user_cache: UserCache, *, machine: Machine | None = None, device: int | None = None
) -> Plan:
    manifest, warnings, manifest_sha256 = read_manifest_sha256(bundle_path)
    machine = machine or probe()
    gpu = pick_gpu(machine, device)
    blocker = trt_blocker(manifest, machine, gpu)
    key = None
    if blocker is None:
        try:
            key = cache_key_for(machine, gpu)
        except MachineError as e:
            blocker = str(e)
    have_user = key is not None and user_cache.has_runtime_cache(model_id(manifest), key)
    return Plan(
        manifest,
        warnings,
        machine,
        gpu,
        key,
        blocker,
        choose_engines(manifest, machine, gpu),
        choose_caches(manifest, machine, gpu, have_user),
        manifest_sha256=manifest_sha256,
    )


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
    verify_weights: str = "once",
    _machine: Machine | None = None,
    _trt_runtime: Any = None,
) -> Session:
    """Open a bundle for inference on this machine. ``_machine``/``_trt_runtime`` replace the probe and TRT-RTX (tests).

    ``weights_on_device`` (engines refit from the weight store): None (default) streams the weights to the GPU through
    gpu_upload's pinned-ring pipeline and refits from device pointers, and refits from host memory only where that
    upload fails (it needs GPU memory for a second copy of the weights during the refit); True: the GPU path or an
    error; False: host memory (every tensor decoded into host RAM, TRT-RTX copies it over).

    ``verify_weights``: "once" (default) hashes every frame of the weight file the first time this user loads that
    very file, then trusts it while its identity (size, times, inode) is unchanged (UserCache.is_verified says why
    that is sound); "always" hashes every frame on every load. Engines and caches are always hashed.
    """
    from .trt.runtime import SPECIALIZATIONS

    if fallback not in FALLBACKS:
        raise BundleError(f"fallback: expected one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if verify_weights not in ("once", "always"):
        raise BundleError(f"verify_weights: expected 'once' or 'always', got {verify_weights!r}")
    if specialization not in SPECIALIZATIONS:
        raise BundleError(f"specialization: expected one of {', '.join(SPECIALIZATIONS)}, got {specialization!r}")
    t_start = time.perf_counter()
    bundle_dir = Path(bundle_path)
    if bundle_dir.is_file():
        raise BundleError(
            f"{bundle_dir}: a file, expected a bundle directory",
            hint="unpack the archive first: trtx-bundle unpack FILE -o DIR",
        )
    user_cache = UserCache(app, cache_dir)
    p = plan(bundle_dir, user_cache, machine=_machine, device=device)
    for w in p.warnings:
        log.warning("%s", w)
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
    failures: list[str] = []
    impl: Any = None
    engine_used: Engine | None = None
    for choice in p.engines:
        if not choice.viable or choice.kind == "fallback":
            continue
        try:
            impl = _open_trt(
                p,
                choice,
                bundle_dir,
                user_cache,
                report,
                specialization=specialization,
                cuda_graphs=cuda_graphs,
                weights_on_device=weights_on_device,
                verify_weights=verify_weights,
                runtime=_trt_runtime,
            )
            engine_used = choice.candidate if isinstance(choice.candidate, Engine) else None
            report.backend = "tensorrt_rtx"
            break
        except MachineError as e:
            failures.append(
                f"{choice.kind} engine {choice.candidate.file.path if choice.candidate else ''}: {e}".replace("  ", " ")
            )
            report.warnings.append(f"TensorRT for RTX could not use the {choice.kind} engine: {e}")
            log.warning("%s", report.warnings[-1])
    if impl is None:
        passed = [f"{c.kind} engine [{c.index}]: {c.reason}" for c in p.engines if c.index is not None and not c.viable]
        report.why_not_trt = (
            p.blocker or "; ".join(passed + failures) or "the bundle has no engine and none could be built here"
        )
        if fallback == "error":
            raise BackendUnavailableError(
                f"{bundle_dir}: TensorRT for RTX cannot run this bundle here: {report.why_not_trt}",
                hint="run 'trtx-bundle doctor BUNDLE' for details, or load with fallback='onnxruntime'",
            )
        impl = OrtSession(p.manifest, bundle_dir, user_cache)
        report.backend = "onnxruntime"
        report.timings.update(impl.timings)
    report.timings["load_s"] = time.perf_counter() - t_start
    return Session(manifest=p.manifest, impl=impl, report=report, user_cache=user_cache, key=p.key, engine=engine_used)


class _StoreWeights:
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


def _open_trt(
    p: Plan,
    choice: Choice,
    bundle_dir: Path,
    user_cache: UserCache,
    report: Report,
    *,
    specialization: str,
    cuda_graphs: bool,
    weights_on_device: bool | None,
    verify_weights: str,
    runtime: Any,
) -> Any:
    from .trt.runtime import TrtRtxRuntime, TrtSession

    t0 = time.perf_counter()
    if isinstance(choice.candidate, Engine):
        where = f"engines[{choice.index}].file"
        plan_bytes = read_verified(bundle_dir, choice.candidate.file, where)
        report.engine = {"kind": choice.kind, "file": choice.candidate.file.path, "index": choice.index}
    else:
        where, plan_bytes = _built_here(p, bundle_dir, user_cache)
        report.engine = {"kind": "built_here", "file": where}
    report.timings["engine_read_s"] = time.perf_counter() - t0
    # Caches in rank order; TRT-RTX takes the first it accepts. Each is verified before TRT-RTX sees its bytes.
    blobs, names = [], []
    for c in p.caches:
        if not c.viable or c.kind == "none":
            continue
        if c.kind == "user_cache" and p.key is not None:
            data = user_cache.read_runtime_cache(model_id(p.manifest), p.key)
            if data is not None:
                blobs.append(data)
                names.append(f"user cache {user_cache.runtime_cache_path(model_id(p.manifest), p.key)}")
        elif c.candidate is not None:
            blobs.append(read_verified(bundle_dir, c.candidate.file, f"runtime_caches[{c.index}].file"))
            names.append(f"bundled runtime_caches[{c.index}] ({c.kind.replace('bundled_', '')} key)")
    weights = (
        _StoreWeights(p.manifest, bundle_dir, user_cache, verify_weights, p.manifest_sha256)
        if choice.kind in ("weightless", "build")
        else None
    )
    try:
        session = TrtSession(
            runtime or TrtRtxRuntime(p.gpu.index),
            plan_bytes,
            weights=weights,
            specialization=specialization,
            cuda_graphs=cuda_graphs,
            caches=blobs,
            weights_on_device=weights_on_device,
            source=where,
        )
    finally:
        if weights is not None:
            weights.reader.close()
    report.timings.update(session.timings)
    if session.refit_from:
        report.engine["weights_from"] = session.refit_from  # "device" (gpu_upload pipeline) or "host"
        report.engine["weights_check"] = weights.check if weights is not None else None
        if weights is not None and weights.decoded_on:
            report.engine["weights_decoded_on"] = weights.decoded_on + (
                f" ({weights.decode_why})" if weights.decode_why else ""
            )
    report.warnings.extend(session.notes)
    if session.cache_loaded is not None:
        report.runtime_cache = names[session.cache_loaded]
    elif blobs:
        report.runtime_cache = f"none: TRT-RTX rejected all {len(blobs)} candidate(s); kernels compile on first use"
        log.info("%s", report.runtime_cache)
    return session


def _built_here(p: Plan, bundle_dir: Path, user_cache: UserCache) -> tuple[str, bytes]:
    """A weightless engine for this GPU, built from the skeleton once and kept in the user cache."""
    from .trt.build import BuildRequest, build_engine

    name = f"{model_id(p.manifest)}-sm{p.gpu.sm}-{p.machine.trt_rtx_version}"
    path = user_cache.engine_path(name)
    kept = user_cache.read_engine(name)
    if kept is not None:
        return str(path), kept
    onnx_path, tmp = materialize_model(p.manifest, bundle_dir, user_cache)
    try:
        profiles = [prof.triples() for prof in p.manifest.profiles]
        try:
            data = build_engine(BuildRequest(onnx_path=str(onnx_path), profiles=profiles, weightless=True))
        except BundleError as e:
            raise MachineError(f"building an engine for this GPU failed: {e}") from None
    finally:
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    user_cache.save_engine(name, data)
    return str(path), data


def validate_inputs(manifest: Manifest, inputs: Mapping[str, Any], profile: int | None = None) -> int:
    """Names, dtypes, ranks, fixed dims and profile ranges, checked before any backend runs (InputError).

    Returns the optimization profile to run under: ``profile`` if given (it must hold the shapes), else the
    first profile that holds them (0 for a bundle without profiles).
    """
    if not isinstance(inputs, Mapping):
        raise InputError(f"run() takes a dict of input name -> numpy array, got {type(inputs).__name__}")
    expected = [t.name for t in manifest.inputs]
    missing, extra = [n for n in expected if n not in inputs], sorted(set(inputs) - set(expected))
    if missing or extra:
        raise InputError(
            f"inputs: expected {expected}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    named: dict[str, tuple[str, int]] = {}
    for spec in manifest.inputs:
        a = inputs[spec.name]
        if not isinstance(a, np.ndarray):
            raise InputError(
                f"input {spec.name!r}: expected a numpy array, got {type(a).__name__}",
                hint="wrap it with numpy.asarray(...)",
            )
        if a.dtype.name != spec.dtype:
            raise InputError(
                f"input {spec.name!r}: expected dtype {spec.dtype}, got {a.dtype.name}",
                hint=f"convert with .astype('{spec.dtype}')",
            )
        if a.ndim != len(spec.shape):
            raise InputError(
                f"input {spec.name!r}: expected rank {len(spec.shape)} (shape {list(spec.shape)}), got rank {a.ndim} {a.shape}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise InputError(f"input {spec.name!r}: axis {axis} must be {want}, got {got} (shape {a.shape})")
            if isinstance(want, str):
                if want in named and named[want][1] != got:
                    raise InputError(
                        f"input {spec.name!r}: axis {axis} ({want!r}) is {got}, but {named[want][0]!r} has {want!r} = {named[want][1]}"
                    )
                named.setdefault(want, (spec.name, got))
    if not manifest.profiles:
        if profile not in (None, 0):
            raise InputError(f"profile {profile}: this bundle has no optimization profiles")
        return 0
    if profile is not None and not 0 <= profile < len(manifest.profiles):
        raise InputError(
            f"profile {profile}: this bundle has {len(manifest.profiles)} optimization profile(s), 0..{len(manifest.profiles) - 1}"
        )
    candidates = [profile] if profile is not None else range(len(manifest.profiles))
    for i in candidates:
        if all(r.contains(tuple(inputs[n].shape)) for n, r in manifest.profiles[i].shapes.items()):
            return i
    i = candidates[0]
    detail = "; ".join(
        f"{n}: shape {list(inputs[n].shape)}, min {list(r.min)}, max {list(r.max)}"
        for n, r in manifest.profiles[i].shapes.items()
        if not r.contains(tuple(inputs[n].shape))
    )
    raise InputError(
        f"inputs outside the bundle's shape profile{'' if len(manifest.profiles) == 1 else f' {i}'} ({detail})",
        hint="split or pad the input, or rebuild the bundle with a wider profile (--shape NAME=MIN:OPT:MAX)",
    )


class Session:
    """A loaded bundle: ``run(dict) -> dict``; saves its runtime cache on close(), at exit and on request."""

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
        return bool(data) and self.user_cache.save_runtime_cache(model_id(self.manifest), self._key, data)

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
