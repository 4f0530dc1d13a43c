"""`doctor --selftest`: the whole TRT-RTX GPU path on the demo model, checked against ONNX Runtime, as one report.

The steps: bundle the demo model (no engines), build a weightless engine for this GPU (trt/build.py through farm.py's
ShimGpu, ``ComputeCapability.CURRENT``) and put it in the bundle, load it through ``runtime_shim.Loader`` (refit from
the weight store; the runtime cache saved on close), load again (the saved cache must be deserialized), then one load
per specialization strategy with CUDA graphs on and off. Every load runs the demo batch and compares the outputs with
ONNX Runtime on the original model. The two seams are the Loader's (``probe``, ``trt_runtime``) and the build
callable, so the sequence is tested end to end on a CPU with the named fakes (tests/test_selftest.py).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime_shim.cache_key import model_id
from runtime_shim.errors import BundleError
from runtime_shim.fsutil import atomic_write, sha256_bytes
from runtime_shim.machine import Machine
from runtime_shim.machine import probe as real_probe
from runtime_shim.manifest import MANIFEST_NAME, CacheKey, Engine, FileRef, Manifest, read_manifest
from runtime_shim.select import assess, pick_gpu

if TYPE_CHECKING:  # pragma: no cover
    from runtime_shim.trt.runtime import TrtRuntime

EXIT_PASSED, EXIT_FAILED, EXIT_CANNOT_RUN = 0, 1, 3  # 3 is farm-job's EXIT_UNSERVABLE: "wrong machine", not "broken"
VERDICT_EXIT = {"passed": EXIT_PASSED, "failed": EXIT_FAILED, "cannot_run": EXIT_CANNOT_RUN}
# TRT-RTX picks its own kernels (and may use TF32 on Ampere and later): the demo's logits are of order 0.1-1, so this
# bound catches a wrong weight or a wrong layout, not rounding.
TOLERANCE = 1e-2
SPECIALIZATIONS = ("lazy", "eager", "none")
MODE_STEPS = tuple(f"specialization={s},cuda_graphs={g}" for g in ("on", "off") for s in SPECIALIZATIONS)
STEPS = (
    "bundle_demo_model",
    "onnxruntime_reference",
    "build_weightless",
    "refit_from_store",
    "runtime_cache_reused",
    *MODE_STEPS,
)  # in the order they run; each is in every report, as skipped where it did not run
APP = "trtx-selftest"

# (bundle dir, manifest, work dir) -> a STRIP_PLAN + REFIT_IDENTICAL engine for this GPU: FarmGpu.build_weightless.
BuildWeightless = Callable[[Path, Manifest, Path], bytes]


@dataclass
class Step:
    """One step of the selftest: ok, failed (with the error) or skipped (with why), its time and its comparison."""

    name: str
    status: str = "skipped"  # "ok" | "failed" | "skipped"
    seconds: float | None = None
    max_abs_diff: float | None = None  # vs ONNX Runtime on the original model, over every run of the step
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SelftestReport:
    """What ``doctor --selftest`` prints: the machine, the versions, every step and the verdict."""

    verdict: str  # "passed" | "failed" | "cannot_run"
    machine: dict[str, Any]
    versions: dict[str, str | None]
    reason: str | None = None  # why it cannot run here, or which steps failed
    gpu: dict[str, Any] | None = None
    tolerance: float = TOLERANCE
    steps: list[Step] = field(default_factory=list)
    seconds: float | None = None

    @property
    def exit_code(self) -> int:
        return VERDICT_EXIT[self.verdict]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["steps"] = [s.to_dict() for s in self.steps]
        out["exit_code"] = self.exit_code
        return out


def default_build_weightless(bundle_dir: Path, manifest: Manifest, workdir: Path) -> bytes:
    """The farm's real weightless build (runtime_shim.trt.build, weightless=True, CURRENT): a supported GPU only."""
    from .farm import ShimGpu

    return ShimGpu().build_weightless(bundle_dir, manifest, workdir)


def versions(machine: Machine) -> dict[str, str | None]:
    """The versions a bug report needs: both distributions, TRT-RTX and its CUDA flavour, the driver, ONNX Runtime."""
    from runtime_shim import __version__ as runtime_version

    from . import __version__ as bundler_version

    try:
        import onnxruntime

        ort_version: str | None = str(onnxruntime.__version__)
    except ImportError:  # the fallback's own dependency: its absence is a failed reference step, reported there
        ort_version = None
    return {
        "trtx_runtime": runtime_version,
        "trtx_bundler": bundler_version,
        "tensorrt_rtx": machine.trt_rtx_version,
        "cuda_flavour": machine.cuda_flavour,
        "driver": machine.driver_version,
        "driver_cuda": machine.driver_cuda_text,
        "onnxruntime": ort_version,
        "python": sys.version.split()[0],
    }


def run_selftest(
    *,
    workdir: Path | None = None,
    device: int | None = None,
    probe: Callable[[], Machine] | None = None,
    trt_runtime: Callable[[int], TrtRuntime] | None = None,
    build_weightless: BuildWeightless | None = None,
) -> SelftestReport:
    """Run every step here (or say why it cannot run) and return the report; never raises for a failed step.

    ``workdir``: where the demo model, bundle and private user cache go (default: a temporary directory, removed
    after). ``probe``/``trt_runtime`` are runtime_shim.Loader's seams and ``build_weightless`` the build's (tests).
    """
    t_start = time.perf_counter()
    probe = probe or real_probe
    machine = probe()
    gpu = pick_gpu(machine, device)
    report = SelftestReport(
        verdict="cannot_run",
        machine=machine.to_dict(),
        versions=versions(machine),
        gpu=next((g for g in machine.to_dict()["gpus"] if gpu is not None and g["index"] == gpu.index), None),
    )
    situation = assess(machine, gpu)
    blocker = situation.blocker
    if device is not None and gpu is None and machine.gpus:  # --device names a GPU this machine does not have
        blocker = f"no GPU with index {device} (found: {', '.join(str(g.index) for g in machine.gpus)})"
    if blocker is not None or gpu is None:
        report.reason = f"TensorRT for RTX cannot run on this machine: {blocker or 'no NVIDIA GPU was found'}"
        report.steps = [Step(name=n, error="skipped: TensorRT for RTX cannot run on this machine") for n in STEPS]
        report.seconds = round(time.perf_counter() - t_start, 6)
        return report
    seams = _Seams(
        device=gpu.index,
        probe=probe,
        trt_runtime=trt_runtime,
        build_weightless=build_weightless or default_build_weightless,
        key=situation.key,
    )
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="trtx-selftest-") as tmp:
            _run_steps(report, Path(tmp), seams)
    else:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        _run_steps(report, Path(workdir), seams)
    failed = [s.name for s in report.steps if s.status == "failed"]
    report.verdict = "failed" if failed else "passed"
    report.reason = f"{len(failed)} step(s) failed: {', '.join(failed)}" if failed else None
    report.seconds = round(time.perf_counter() - t_start, 6)
    return report


@contextmanager
def _step(report: SelftestReport, name: str, *, needs: tuple[str, ...] = ()) -> Iterator[Step | None]:
    """Time one step and record how it ended; yields None (the step is skipped) when a step it needs did not pass."""
    step = Step(name=name)
    report.steps.append(step)
    blocked = [s.name for s in report.steps if s.name in needs and s.status != "ok"]
    if blocked:
        step.error = f"skipped: {', '.join(blocked)} did not pass"
        yield None
        return
    t0 = time.perf_counter()
    try:
        yield step
    except Exception as e:  # every failure becomes the step's verdict: the report is what the user attaches
        step.status = "failed"
        hint = getattr(e, "hint", None)
        step.error = f"{type(e).__name__}: {e}" + (f" (hint: {hint})" if hint else "")
        frames = traceback.extract_tb(e.__traceback__)
        if frames:  # where it was raised: what a maintainer looks at first
            step.detail["raised_at"] = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}"
    else:
        step.status = "ok"
    finally:
        step.seconds = round(time.perf_counter() - t0, 6)


@dataclass(frozen=True)
class _Seams:
    device: int
    probe: Callable[[], Machine]
    trt_runtime: Callable[[int], TrtRuntime] | None
    build_weightless: BuildWeightless
    key: CacheKey | None  # this GPU's runtime-cache key: where the first load's cache must have been saved


def _run_steps(report: SelftestReport, work: Path, seams: _Seams) -> None:
    from runtime_shim.session import Loader

    from .demo import DEMO_INPUT

    bundle_dir = work / "bundle"
    loader = Loader(probe=seams.probe, trt_runtime=seams.trt_runtime)
    device, key = seams.device, seams.key
    # Two shapes inside the demo's profile, the first twice: a captured CUDA graph is replayed, then re-captured.
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, 3, 48, 40)).astype(np.float32)
    feeds = [{DEMO_INPUT: a}, {DEMO_INPUT: a}, {DEMO_INPUT: rng.standard_normal((1, 3, 32, 64)).astype(np.float32)}]
    references: list[dict[str, np.ndarray]] = []

    with _step(report, "bundle_demo_model") as step:
        assert step is not None  # no prerequisite: never skipped
        model_path = _bundle_demo(work, bundle_dir)
        step.detail["bundle"] = str(bundle_dir)
    with _step(report, "onnxruntime_reference", needs=("bundle_demo_model",)) as step:
        if step is not None:
            import onnxruntime as ort

            ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
            references += [dict(zip([o.name for o in ref.get_outputs()], ref.run(None, dict(f)))) for f in feeds]
    with _step(report, "build_weightless", needs=("bundle_demo_model",)) as step:
        if step is not None:
            step.detail.update(_add_weightless_engine(bundle_dir, work, report, seams.build_weightless))

    def load_and_compare(step: Step, specialization: str, cuda_graphs: bool) -> Any:
        t0 = time.perf_counter()
        session = loader.load(
            bundle_dir,
            APP,
            cache_dir=work / "user-cache",
            specialization=specialization,
            cuda_graphs=cuda_graphs,
            fallback="error",  # a quiet ONNX Runtime fallback would pass every comparison and prove nothing
            device=device,
        )
        with session:
            step.detail["load_s"] = round(time.perf_counter() - t0, 6)
            r = session.report
            step.detail.update(backend=r.backend, engine=r.engine, runtime_cache=r.runtime_cache)
            step.detail["warnings"] = list(r.warnings)
            if r.backend != "tensorrt_rtx" or (r.engine or {}).get("kind") != "weightless":
                raise BundleError(f"the selftest's weightless engine was not used: backend {r.backend}, {r.engine}")
            step.detail["timings"] = {k: round(v, 6) for k, v in r.timings.items()}
            step.max_abs_diff = _compare(session, feeds, references)
            if not step.max_abs_diff <= TOLERANCE:  # NaN fails too
                raise BundleError(
                    f"outputs differ from ONNX Runtime by up to {step.max_abs_diff:.3g} (tolerance {TOLERANCE})"
                )
        return session

    gpu_steps = ("onnxruntime_reference", "build_weightless")
    with _step(report, "refit_from_store", needs=gpu_steps) as step:
        if step is not None:
            session = load_and_compare(step, "lazy", True)
            if not (session.report.engine or {}).get("weights_from"):
                raise BundleError("the weightless engine ran without being refit from the weight store")
            if session.report.runtime_cache is not None:
                raise BundleError(f"the first load found a runtime cache already: {session.report.runtime_cache}")
            saved = key and session.user_cache.read_runtime_cache(model_id(session.manifest), key)
            if not saved:
                raise BundleError("closing the session saved no runtime cache in the user cache dir")
            step.detail["runtime_cache_saved_bytes"] = len(saved)
    with _step(report, "runtime_cache_reused", needs=(*gpu_steps, "refit_from_store")) as step:
        if step is not None:
            session = load_and_compare(step, "lazy", True)
            if not str(session.report.runtime_cache or "").startswith("user cache"):
                raise BundleError(
                    f"the second load did not deserialize the saved runtime cache: {session.report.runtime_cache}"
                )
    for name in MODE_STEPS:
        spec, graphs = name.removeprefix("specialization=").split(",cuda_graphs=")
        with _step(report, name, needs=gpu_steps) as step:
            if step is not None:
                load_and_compare(step, spec, graphs == "on")


def _bundle_demo(work: Path, bundle_dir: Path) -> Path:
    """The demo model and a bundle of it with no engine: the weightless one comes from this GPU's build."""
    from runtime_shim.manifest import Profile, ShapeRange

    from .build import build_bundle
    from .config import BuildOptions
    from .demo import DEMO_INPUT, DEMO_SHAPES, make_demo_model

    model_path = make_demo_model(work)
    lo, opt, hi = DEMO_SHAPES[DEMO_INPUT]
    options = BuildOptions(
        name="demo_classifier",
        version="1.0",
        profiles=(Profile(shapes={DEMO_INPUT: ShapeRange(min=lo, opt=opt, max=hi)}),),
        weightful=False,
        weightless=False,
        force=True,
    )
    build_bundle(model_path, bundle_dir, options=options)
    return model_path


def _add_weightless_engine(
    bundle_dir: Path, work: Path, report: SelftestReport, build_weightless: BuildWeightless
) -> dict[str, Any]:
    """Build the engine for this GPU and make it the bundle's only engine, as a merged farm part would."""
    manifest, _ = read_manifest(bundle_dir)
    t0 = time.perf_counter()
    data = build_weightless(bundle_dir, manifest, work)
    build_s = time.perf_counter() - t0
    gpu, machine = report.gpu or {}, report.machine
    sha = sha256_bytes(data)
    engine = Engine(
        kind="weightless",
        platform=machine["platform"],
        compute_capabilities=(int(gpu["sm"]),),
        trt_rtx_version=report.versions["tensorrt_rtx"] or "",
        file=FileRef.for_content("engines", sha, len(data)),
        built_by={"tool": f"trtx-bundler {report.versions['trtx_bundler']}", "builder": "selftest"},
    )
    (bundle_dir / engine.file.path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(bundle_dir / engine.file.path, data)
    atomic_write(bundle_dir / MANIFEST_NAME, dataclasses.replace(manifest, engines=(engine,)).to_json())
    return {"engine_bytes": len(data), "engine_sha256": sha, "build_s": round(build_s, 6), "sm": gpu["sm"]}


def _compare(session: Any, feeds: list[dict[str, np.ndarray]], refs: list[dict[str, np.ndarray]]) -> float:
    """The largest |TRT-RTX - ONNX Runtime| over every run and output; BundleError on a missing or misshapen output."""
    worst = 0.0
    for i, (feed, ref) in enumerate(zip(feeds, refs)):
        got: Mapping[str, np.ndarray] = session.run(feed)
        for name, want in ref.items():
            out = got.get(name)
            if out is None or out.shape != want.shape:
                raise BundleError(
                    f"run {i}: output {name!r}: expected shape {want.shape} (ONNX Runtime), "
                    f"got {None if out is None else out.shape}"
                )
            worst = max(worst, float(np.max(np.abs(out.astype(np.float64) - want))) if want.size else 0.0)
    return worst
