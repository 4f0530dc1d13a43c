"""Farm jobs: on a machine with a target GPU, build its weightless engine and pregenerate its runtime cache as a *part*.

The part format is in bundler/part.py; ``merge`` (bundler/merge.py) folds parts into the bundle.

The GPU work goes through the shim (runtime_shim.session / trt_session), behind the small ``FarmGpu``
seam, so the bookkeeping here is tested on machines without a GPU and the GPU part only where one exists.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from runtime_shim import __version__
from runtime_shim.cache_key import cache_key_for
from runtime_shim.errors import BundleError, MachineError
from runtime_shim.fsutil import atomic_write, sha256_bytes
from runtime_shim.machine import Gpu, Machine, unsupported_reason
from runtime_shim.machine import probe as real_probe
from runtime_shim.manifest import (
    MANIFEST_NAME,
    Engine,
    FileRef,
    Manifest,
    Profile,
    RuntimeCache,
    Shape,
    read_manifest_sha256,
)
from runtime_shim.schema import kind_name

from .part import Part, WarmupRun, base_sha256, write_part

log = logging.getLogger(__name__)

EXIT_UNSERVABLE = 3  # documented in `farm-job --help` and docs: CI can tell "wrong runner" from "job failed"
DEFAULT_ROUNDS = 2  # EAGER compiles on the first run; the second proves the cached kernels serve the shape


class UnservableMachineError(MachineError):
    """TRT-RTX cannot run on this machine at all (no GPU, unsupported SM, old driver): exit code 3."""

    exit_code = EXIT_UNSERVABLE


# --------------------------------------------------------------------------- warm-up plan
def parse_warmup_arg(value: str) -> dict[str, Shape]:
    """``NAME=SHAPE[,NAME=SHAPE...]``: one warm-up run's shapes (dims joined by x), e.g. ``x=8x64``."""
    from .config import ConfigError, parse_dims

    shapes: dict[str, Shape] = {}
    for item in value.split(","):
        name, sep, dims = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--warmup {value!r}: expected NAME=SHAPE (e.g. x=8x64; several inputs: a=1x3,b=1x5)")
        shapes[name.strip()] = parse_dims(dims, where=f"--warmup {value}")
    return shapes


def warmup_plan(manifest: Manifest, extra: Sequence[Mapping[str, Shape]] = ()) -> tuple[WarmupRun, ...]:
    """Every (profile, full shape set) to run: each warm-up shape under every profile it fits.

    Inputs a warm-up leaves out take the profile's opt shape (or their fixed shape). Without any warm-up
    shape, each profile's min, opt and max are run, so the cache holds the kernels of its corners.
    """
    specs = {t.name: t for t in manifest.inputs}
    warmups = list(manifest.warmup_shapes) + list(extra)
    profiles: Sequence[Profile] = manifest.profiles or (Profile(shapes={}),)
    for w in warmups:
        for name, shape in w.items():
            if name not in specs:
                raise BundleError(
                    f"warm-up {_fmt(w)}: the bundle has no input {name!r}", hint=f"inputs: {', '.join(specs)}"
                )
            if len(shape) != len(specs[name].shape):
                raise BundleError(
                    f"warm-up {_fmt(w)}: {name!r} has rank {len(specs[name].shape)}, got {len(shape)} dims"
                )

    def full(profile: Profile, given: Mapping[str, Shape]) -> dict[str, Shape] | None:
        out: dict[str, Shape] = {}
        for name, spec in specs.items():
            rng = profile.shapes.get(name)
            shape = given.get(name) or (
                rng.opt if rng else tuple(d if isinstance(d, int) and d >= 0 else 1 for d in spec.shape)
            )
            if rng is not None and not rng.contains(shape):
                return None
            if rng is None and any(isinstance(d, int) and d >= 0 and d != s for d, s in zip(spec.shape, shape)):
                return None
            out[name] = tuple(shape)
        return out

    runs: list[WarmupRun] = []
    for p, profile in enumerate(profiles):
        candidates = warmups or [{n: getattr(r, c) for n, r in profile.shapes.items()} for c in ("min", "opt", "max")]
        for w in candidates:
            shapes = full(profile, w)
            if shapes is not None and all(run.profile != p or run.shapes != shapes for run in runs):
                runs.append(WarmupRun(profile=p, shapes=shapes))
    for w in warmups:
        if not any(all(run.shapes.get(n) == tuple(s) for n, s in w.items()) for run in runs):
            raise BundleError(
                f"warm-up {_fmt(w)} fits no optimization profile of the bundle",
                hint="choose shapes inside a profile's min..max ('trtx-bundle inspect' lists them)",
            )
    return tuple(runs)


def _fmt(shapes: Mapping[str, Shape]) -> str:
    return ",".join(f"{n}={'x'.join(map(str, s))}" for n, s in sorted(shapes.items()))


# --------------------------------------------------------------------------- the farm job
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
        # A private cache dir: the job starts from an empty runtime cache, not from whatever this runner kept.
        session = load(
            bundle_dir,
            app="trtx-farm",
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


@dataclass(frozen=True, kw_only=True)
class FarmResult:
    part_dir: Path
    part: Part
    engine_built: bool


Progress = Callable[[str], None]


def check_servable(machine: Machine) -> Gpu:
    """The GPU a farm job serves (CUDA device 0), or UnservableMachineError saying what was found."""
    found = _describe(machine)
    hint = (
        "run farm jobs on runners with a GPU TensorRT for RTX supports (RTX / workstation: SM 7.5, 8.0, 8.6, 8.9, 12.x); "
        f"exit code {EXIT_UNSERVABLE} marks this case so CI can tell a mislabelled runner from a failed job"
    )
    if machine.problem or not machine.gpus:
        raise UnservableMachineError(
            f"this machine cannot serve TensorRT for RTX: {machine.problem or 'no GPU found'} (found: {found})",
            hint=hint,
        )
    gpu = machine.gpus[0]  # CURRENT builds for device 0: choose another with CUDA_VISIBLE_DEVICES
    reason = unsupported_reason(gpu)
    if reason is None and (driver := machine.driver_problem()):
        reason = driver
    if reason is None and machine.platform not in ("linux_x86_64", "windows_amd64"):
        reason = f"platform {machine.platform} is not one TensorRT for RTX bundles target (linux_x86_64, windows_amd64)"
    if reason is not None:
        others = [g for g in machine.gpus[1:] if unsupported_reason(g) is None]
        if others and unsupported_reason(gpu) is not None:
            hint += f"; this machine also has {others[0].name} (GPU {others[0].index}): select it with CUDA_VISIBLE_DEVICES={others[0].index}"
        raise UnservableMachineError(
            f"this machine cannot serve TensorRT for RTX: {reason} (found: {found})", hint=hint
        )
    if not machine.trt_rtx_version or not machine.cuda_flavour:
        raise MachineError(
            "tensorrt_rtx is not installed on this farm machine",
            hint="pip install tensorrt-rtx==<the bundle's TRT-RTX version>",
        )
    return gpu


def _describe(machine: Machine) -> str:
    gpus = "; ".join(f"GPU {g.index} {g.name} SM {g.sm_text}" for g in machine.gpus) or "no GPU"
    return (
        f"{machine.os}/{machine.platform}, driver {machine.driver_version or 'none'}, {gpus}, "
        f"TRT-RTX {machine.trt_rtx_version or 'not installed'} ({machine.cuda_flavour or '-'})"
    )


def run_farm_job(
    bundle_dir: str | os.PathLike[str],
    part_dir: str | os.PathLike[str],
    *,
    warmups: Sequence[Mapping[str, Shape]] = (),
    rounds: int = DEFAULT_ROUNDS,
    progress: Progress | None = None,
    probe: Callable[[], Machine] | None = None,
    gpu_backend: FarmGpu | None = None,
) -> FarmResult:
    """Make one part for this machine's GPU. Nothing is written unless the whole job succeeds."""
    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    machine = (probe or real_probe)()
    gpu = check_servable(machine)  # before anything touches the disk
    timings = {"probe_s": time.perf_counter() - t_start}
    bundle_dir, part_dir = Path(bundle_dir), Path(part_dir)
    manifest, _warnings, manifest_sha = read_manifest_sha256(bundle_dir)  # merge checks the part was made for that sha
    if manifest.trt_rtx.version != machine.trt_rtx_version or manifest.trt_rtx.cuda_flavour != machine.cuda_flavour:
        raise MachineError(
            f"{bundle_dir / MANIFEST_NAME}: trt_rtx is {manifest.trt_rtx.version} ({manifest.trt_rtx.cuda_flavour}), "
            f"but this farm machine has TRT-RTX {machine.trt_rtx_version} ({machine.cuda_flavour}); engines and caches are version-locked",
            hint=f"install tensorrt-rtx{'-cu12' if manifest.trt_rtx.cuda_flavour == 'cu12' else ''}=={manifest.trt_rtx.version} on this runner",
        )
    if part_dir.exists() and (not part_dir.is_dir() or any(part_dir.iterdir())):
        raise BundleError(
            f"{part_dir}: already exists and is not an empty directory; a farm job never overwrites a part",
            hint="pass a new -o PART_DIR, or delete the old one",
        )
    runs = warmup_plan(manifest, warmups)
    if rounds < 1:
        raise BundleError(f"--rounds: expected >= 1, got {rounds}")
    key = cache_key_for(machine, gpu)
    backend = gpu_backend or ShimGpu()

    existing = [
        e
        for e in manifest.engines
        if e.kind == "weightless"
        and e.platform == machine.platform
        and tuple(e.compute_capabilities) == (gpu.sm,)
        and e.trt_rtx_version == machine.trt_rtx_version
    ]
    with tempfile.TemporaryDirectory(prefix="trtx-farm-") as tmp:
        work = Path(tmp)
        new_engine: Engine | None = None
        engine_bytes = b""
        if existing:
            engine_sha = existing[0].file.sha256
            say(f"the bundle already has a weightless engine for SM {gpu.sm_text} ({engine_sha[:12]}): reusing it")
        else:
            refused = manifest.trt_rtx.cannot_parse
            if refused is not None:  # recorded at build: the parser would refuse it again, after a long wait here
                raise BundleError(
                    f"{bundle_dir / MANIFEST_NAME}: TensorRT for RTX's parser refused this model when it was bundled "
                    f"({refused.summary()}): no weightless engine can be built from it",
                    hint="users of this bundle run it through the ONNX Runtime fallback; to serve RTX GPUs, replace "
                    "or decompose those ops in the model and bundle it again",
                )
            say(f"building the weightless engine for {gpu.name} (SM {gpu.sm_text}) ...")
            t = time.perf_counter()
            engine_bytes = backend.build_weightless(bundle_dir, manifest, work)
            timings["build_s"] = time.perf_counter() - t
            engine_sha = sha256_bytes(engine_bytes)
            new_engine = Engine(
                kind="weightless",
                platform=machine.platform,
                compute_capabilities=(gpu.sm,),
                trt_rtx_version=machine.trt_rtx_version,
                file=FileRef.for_content("engines", engine_sha, len(engine_bytes)),
                built_by={
                    "tool": f"trtx-bundler {__version__}",
                    "builder": "farm",
                    "gpu": gpu.name,
                    "driver": machine.driver_version or "?",
                },
            )
        overlay = _overlay_bundle(bundle_dir, manifest, work / "bundle", new_engine, engine_bytes, engine_sha)
        say(f"warming up {len(runs)} shape set(s) x {rounds} round(s) with EAGER specialization ...")
        cache_bytes, done_runs, warm_timings = backend.warm(overlay, engine_sha, runs, rounds, work)
        timings.update(warm_timings)
        if not cache_bytes:
            raise BundleError(
                "the runtime cache came back empty after the warm-up", hint="run with -vv to see TRT-RTX's log"
            )
        cache_sha = sha256_bytes(cache_bytes)
        part = Part(
            bundle_manifest_sha256=manifest_sha,
            bundle_base_sha256=base_sha256(manifest),
            model=manifest.model.name,
            engine=new_engine,
            runtime_cache=RuntimeCache(
                key=key,
                engines=(engine_sha,),
                file=FileRef.for_content("caches", cache_sha, len(cache_bytes)),
                created=int(time.time()),
            ),
            warmup=tuple(done_runs),
            timings={k: round(v, 6) for k, v in {**timings, "total_s": time.perf_counter() - t_start}.items()},
            machine={
                "host": socket.gethostname(),
                "gpu_uuid": gpu.uuid,
                "gpu_index": str(gpu.index),
                "driver_version": machine.driver_version or "",
                "platform": machine.platform,
            },
            created=int(time.time()),
        )
        write_part(part_dir, part, {"engines": engine_bytes, "caches": cache_bytes})
    say(f"part written to {part_dir}")
    return FarmResult(part_dir=part_dir, part=part, engine_built=new_engine is not None)


def _overlay_bundle(
    bundle_dir: Path, manifest: Manifest, dest: Path, new_engine: Engine | None, engine_bytes: bytes, engine_sha: str
) -> Path:
    """A throw-away bundle with only the farm's engine and no runtime cache, so the shim must load that engine
    and start from an empty cache. Files are linked, not copied, where the file system allows."""
    from dataclasses import replace

    dest.mkdir(parents=True)
    # A farm that built no engine loads one the bundle already has, so one of the two lists is never empty.
    engines = [e for e in manifest.engines if e.file.sha256 == engine_sha] or [
        e for e in (new_engine,) if e is not None
    ]
    overlay = replace(manifest, engines=tuple(engines), runtime_caches=())
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


# --------------------------------------------------------------------------- [farm] in bundle.toml
@dataclass(frozen=True, kw_only=True)
class FarmSettings:
    targets: tuple[
        str, ...
    ] = ()  # the CI runner labels the farm matrix covers (documentation the templates test keeps honest)
    warmup: tuple[Mapping[str, Shape], ...] = ()  # run by farm-job on top of the manifest's warm-up shapes
    rounds: int | None = None


def farm_settings(table: Mapping[str, Any], *, source: str) -> FarmSettings:
    """Validate the [farm] table that bundler.config.load_config hands over unread."""
    from .config import ConfigError, _no_unknown, parse_dims

    _no_unknown(table, {"targets", "warmup", "rounds"}, source, "farm.")
    targets = table.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(
            f'{source}: farm.targets: expected a list of runner labels like "rtx4090-linux", got {targets!r}'
        )
    raw = table.get("warmup", [])
    if not isinstance(raw, list):
        raise ConfigError(
            f'{source}: farm.warmup: expected a list of tables like {{ x = "8x64" }}, got {kind_name(raw)}'
        )
    warmups = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not item or not all(isinstance(v, str) for v in item.values()):
            raise ConfigError(
                f'{source}: farm.warmup[{i}]: expected a table of input name -> "dims", e.g. {{ x = "8x64" }}'
            )
        warmups.append({k: parse_dims(v, where=f"{source}: farm.warmup[{i}].{k}") for k, v in sorted(item.items())})
    rounds = table.get("rounds")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ConfigError(f"{source}: farm.rounds: expected an integer >= 1, got {rounds!r}")
    return FarmSettings(targets=tuple(targets), warmup=tuple(warmups), rounds=rounds)
