"""Farm jobs: on a machine with a target GPU, build its weightless engines and pregenerate their runtime caches as *parts*.

One part per model of the bundle. The part format and the PART_DIR layout are in bundler/part.py; ``merge``
(bundler/merge.py) folds parts into the bundle. The warm-up plan is in farm_warmup.py; the GPU work goes
through the shim behind the small ``FarmGpu`` seam (farm_gpu.py), so the bookkeeping here is tested on machines
without a GPU and the GPU part only where one exists.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_shim import __version__
from runtime_shim.cache_key import cache_key_for
from runtime_shim.errors import BundleError, MachineError
from runtime_shim.fsutil import sha256_bytes
from runtime_shim.machine import Gpu, Machine, unsupported_reason
from runtime_shim.machine import probe as real_probe
from runtime_shim.manifest import (
    MANIFEST_NAME,
    CacheKey,
    Engine,
    FileRef,
    Manifest,
    RuntimeCache,
    Shape,
    read_bundle_manifest,
)
from runtime_shim.schema import kind_name

from .farm_gpu import FarmGpu, ShimGpu, overlay_bundle
from .farm_warmup import parse_warmup_arg, warmup_plan, warmups_by_model
from .part import Part, PartStage, WarmupRun, base_sha256, model_dirs

__all__ = [
    "DEFAULT_ROUNDS",
    "EXIT_UNSERVABLE",
    "FarmGpu",
    "FarmResult",
    "FarmSettings",
    "ModelJob",
    "ShimGpu",
    "UnservableMachineError",
    "check_servable",
    "farm_settings",
    "parse_warmup_arg",
    "run_farm_job",
    "warmup_plan",
]

log = logging.getLogger(__name__)

EXIT_UNSERVABLE = 3  # documented in `farm-job --help` and docs: CI can tell "wrong runner" from "job failed"
DEFAULT_ROUNDS = 2  # EAGER compiles on the first run; the second proves the cached kernels serve the shape


class UnservableMachineError(MachineError):
    """TRT-RTX cannot run on this machine at all (no GPU, unsupported SM, old driver): exit code 3."""

    exit_code = EXIT_UNSERVABLE


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, kw_only=True)
class ModelJob:
    """What the job did for one model: its part (at ``part_dir`` once written), or the error that stopped it."""

    model: str
    part_dir: Path | None = None
    part: Part | None = None
    engine_built: bool = False
    error: BundleError | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ok": self.error is None,
            "part_dir": str(self.part_dir) if self.part_dir is not None else None,
            "engine_built": self.engine_built,
            "part": self.part.to_dict() if self.part is not None else None,
            "error": str(self.error) if self.error is not None else None,
            "hint": self.error.hint if self.error is not None else None,
        }


@dataclass(frozen=True, kw_only=True)
class FarmResult:
    """The whole job: one ``ModelJob`` per model of the bundle, in the bundle's order."""

    part_dir: Path
    models: tuple[ModelJob, ...]

    @property
    def failed(self) -> tuple[ModelJob, ...]:
        return tuple(j for j in self.models if j.error is not None)

    @property
    def part(self) -> Part:
        """The first part written (a one-model bundle's only one)."""
        return next(j.part for j in self.models if j.part is not None)

    @property
    def engine_built(self) -> bool:
        return next(j.engine_built for j in self.models if j.part is not None)

    def to_dict(self) -> dict[str, Any]:
        return {"part_dir": str(self.part_dir), "models": [j.to_dict() for j in self.models]}


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
    """Make a part for this machine's GPU for every model of the bundle, written at once into ``part_dir``.

    What is wrong with the machine, the bundle or the arguments raises before any GPU work. A model whose work
    fails (its parser verdict, the build, the warm-up) is reported in the result's ``ModelJob`` and the other
    models' parts are still written; when every model fails, its error (or one naming each model's) is raised
    and nothing is written.
    """
    say = progress or (lambda _m: None)
    t_start = time.perf_counter()
    machine = (probe or real_probe)()
    gpu = check_servable(machine)  # before anything touches the disk
    probe_s = time.perf_counter() - t_start
    bundle_dir, part_dir = Path(bundle_dir), Path(part_dir)
    # merge checks each part was made for that sha (or the same model base)
    bundle, _warnings, manifest_sha = read_bundle_manifest(bundle_dir)
    want = bundle.trt_rtx
    if want.version != machine.trt_rtx_version or want.cuda_flavour != machine.cuda_flavour:
        raise MachineError(
            f"{bundle_dir / MANIFEST_NAME}: trt_rtx is {want.version} ({want.cuda_flavour}), "
            f"but this farm machine has TRT-RTX {machine.trt_rtx_version} ({machine.cuda_flavour}); engines and caches are version-locked",
            hint=f"install tensorrt-rtx{'-cu12' if want.cuda_flavour == 'cu12' else ''}=={want.version} on this runner",
        )
    if part_dir.exists() and (not part_dir.is_dir() or any(part_dir.iterdir())):
        raise BundleError(
            f"{part_dir}: already exists and is not an empty directory; a farm job never overwrites a part",
            hint="pass a new -o PART_DIR, or delete the old one",
        )
    if rounds < 1:
        raise BundleError(f"--rounds: expected >= 1, got {rounds}")
    views = bundle.views()
    several = len(views) > 1
    extra = warmups_by_model(bundle, warmups)
    plans = {}
    for view in views:
        try:
            plans[view.model.name] = warmup_plan(view, extra[view.model.name])
        except BundleError as e:
            if not several:
                raise
            raise BundleError(f"model {view.model.name!r}: {e}", hint=e.hint) from None
    job = _Job(
        bundle_dir=bundle_dir,
        manifest_sha=manifest_sha,
        machine=machine,
        gpu=gpu,
        key=cache_key_for(machine, gpu),
        backend=gpu_backend or ShimGpu(),
        rounds=rounds,
        probe_s=probe_s,
    )
    jobs: list[ModelJob] = []
    dirs = model_dirs([v.model.name for v in views]) if several else [""]
    with tempfile.TemporaryDirectory(prefix="trtx-farm-") as tmp, PartStage(part_dir) as stage:
        for i, (view, subdir) in enumerate(zip(views, dirs)):
            name = view.model.name
            tell = (lambda m, n=name: say(f"{n}: {m}")) if several else say
            try:
                part, blobs = job.run(view, plans[name], Path(tmp) / str(i), tell)
            except BundleError as e:
                if several:
                    say(f"{name}: FAILED: {e}")
                jobs.append(ModelJob(model=name, error=e))
                continue
            where = stage.add(part, blobs, subdir)
            jobs.append(ModelJob(model=name, part_dir=where, part=part, engine_built=part.engine is not None))
        failed = [j for j in jobs if j.error is not None]
        if len(failed) == len(jobs):
            if len(jobs) == 1 and failed[0].error is not None:
                raise failed[0].error
            raise BundleError(
                f"the farm job failed for every model of {bundle_dir}: "
                + "; ".join(f"{j.model}: {j.error}" for j in failed),
                hint="nothing was written; see each model's error above",
            )
        stage.commit()
    ok = len(jobs) - len(failed)
    say(f"part{'s' if ok > 1 else ''} written to {part_dir}" + (f" ({ok} of {len(jobs)} models)" if several else ""))
    return FarmResult(part_dir=part_dir, models=tuple(jobs))


@dataclass(frozen=True, kw_only=True)
class _Job:
    """What every model's work in one job shares: the bundle, this machine and its GPU."""

    bundle_dir: Path
    manifest_sha: str
    machine: Machine
    gpu: Gpu
    key: CacheKey
    backend: FarmGpu
    rounds: int
    probe_s: float

    def run(
        self, manifest: Manifest, runs: tuple[WarmupRun, ...], work: Path, say: Progress
    ) -> tuple[Part, dict[str, bytes]]:
        """One model's part and its files' bytes (by folder), or a BundleError saying why not."""
        t_start = time.perf_counter()
        machine, gpu = self.machine, self.gpu
        timings = {"probe_s": self.probe_s}
        existing = [
            e
            for e in manifest.engines
            if e.kind == "weightless"
            and e.platform == machine.platform
            and tuple(e.compute_capabilities) == (gpu.sm,)
            and e.trt_rtx_version == machine.trt_rtx_version
        ]
        work.mkdir(parents=True)
        new_engine: Engine | None = None
        engine_bytes = b""
        if existing:
            engine_sha = existing[0].file.sha256
            say(f"the bundle already has a weightless engine for SM {gpu.sm_text} ({engine_sha[:12]}): reusing it")
        else:
            refused = manifest.trt_rtx.cannot_parse
            if refused is not None:  # recorded at build: the parser would refuse it again, after a long wait here
                raise BundleError(
                    f"{self.bundle_dir / MANIFEST_NAME}: TensorRT for RTX's parser refused model {manifest.model.name!r} "
                    f"when it was bundled ({refused.summary()}): no weightless engine can be built from it",
                    hint="users of this bundle run it through the ONNX Runtime fallback; to serve RTX GPUs, replace "
                    "or decompose those ops in the model and bundle it again",
                )
            say(f"building the weightless engine for {gpu.name} (SM {gpu.sm_text}) ...")
            t = time.perf_counter()
            engine_bytes = self.backend.build_weightless(self.bundle_dir, manifest, work)
            timings["build_s"] = time.perf_counter() - t
            engine_sha = sha256_bytes(engine_bytes)
            new_engine = Engine(
                kind="weightless",
                platform=machine.platform,
                compute_capabilities=(gpu.sm,),
                trt_rtx_version=machine.trt_rtx_version or "",
                file=FileRef.for_content("engines", engine_sha, len(engine_bytes)),
                built_by={
                    "tool": f"trtx-bundler {__version__}",
                    "builder": "farm",
                    "gpu": gpu.name,
                    "driver": machine.driver_version or "?",
                },
            )
        overlay = overlay_bundle(self.bundle_dir, manifest, work / "bundle", new_engine, engine_bytes, engine_sha)
        say(f"warming up {len(runs)} shape set(s) x {self.rounds} round(s) with EAGER specialization ...")
        cache_bytes, done_runs, warm_timings = self.backend.warm(overlay, engine_sha, runs, self.rounds, work)
        timings.update(warm_timings)
        if not cache_bytes:
            raise BundleError(
                "the runtime cache came back empty after the warm-up", hint="run with -vv to see TRT-RTX's log"
            )
        cache_sha = sha256_bytes(cache_bytes)
        timings["total_s"] = self.probe_s + time.perf_counter() - t_start
        part = Part(
            bundle_manifest_sha256=self.manifest_sha,
            bundle_base_sha256=base_sha256(manifest),
            model=manifest.model.name,
            engine=new_engine,
            runtime_cache=RuntimeCache(
                key=self.key,
                engines=(engine_sha,),
                file=FileRef.for_content("caches", cache_sha, len(cache_bytes)),
                created=int(time.time()),
            ),
            warmup=tuple(done_runs),
            timings={k: round(v, 6) for k, v in timings.items()},
            machine={
                "host": socket.gethostname(),
                "gpu_uuid": gpu.uuid,
                "gpu_index": str(gpu.index),
                "driver_version": machine.driver_version or "",
                "platform": machine.platform,
            },
            created=int(time.time()),
        )
        return part, {"engines": engine_bytes, "caches": cache_bytes}


# --------------------------------------------------------------------------- [farm] in bundle.toml
@dataclass(frozen=True, kw_only=True)
class FarmSettings:
    targets: tuple[
        str, ...
    ] = ()  # the CI runner labels the farm matrix covers (documentation the templates test keeps honest)
    warmup: tuple[Mapping[str, Shape], ...] = ()  # run by farm-job on top of the manifest's warm-up shapes
    rounds: int | None = None


def farm_settings(table: Mapping[str, Any], *, source: str) -> FarmSettings:
    """Validate the [farm] table that bundler.config_file.load_config hands over unread."""
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
        # TOML reads a model's input, { det.x = "8x64" }, as a table in the table: flattened to "det.x".
        flat = {
            f"{k}.{k2}" if isinstance(v, Mapping) else k: v2
            for k, v in (item.items() if isinstance(item, Mapping) else ())
            for k2, v2 in (v.items() if isinstance(v, Mapping) else ((None, v),))
        }
        if not isinstance(item, Mapping) or not flat or not all(isinstance(v, str) for v in flat.values()):
            raise ConfigError(
                f'{source}: farm.warmup[{i}]: expected a table of input name -> "dims", e.g. {{ x = "8x64" }} '
                '(one model\'s input in a bundle of several: { det.x = "8x64" })'
            )
        warmups.append({k: parse_dims(v, where=f"{source}: farm.warmup[{i}].{k}") for k, v in sorted(flat.items())})
    rounds = table.get("rounds")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ConfigError(f"{source}: farm.rounds: expected an integer >= 1, got {rounds!r}")
    return FarmSettings(targets=tuple(targets), warmup=tuple(warmups), rounds=rounds)
