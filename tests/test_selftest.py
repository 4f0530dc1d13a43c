"""`doctor --selftest`: its sequence end to end on the CPU through the named fakes (the TRT-RTX runtime of
test_trt_session.py, a probe describing an RTX 4090, a build that hands over a real weightful CPU engine), its
exit codes, and the real thing: cannot_run here, the whole GPU path where a supported GPU exists (rtx_gpu)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from test_farm import gpu, machine
from test_merge import real_engine
from test_trt_session import RecordingFakeTrtRuntime

from bundler import selftest
from bundler.cli import main
from runtime_shim.errors import EngineBuildError
from runtime_shim.machine import probe, unsupported_reason
from runtime_shim.manifest import read_manifest
from runtime_shim.select import assess, pick_gpu

HERE = probe()
WHY_NOT_HERE = assess(HERE, pick_gpu(HERE)).blocker  # None where a GPU TRT-RTX supports is present
RTX4090_MACHINE = machine(gpu(), version=HERE.trt_rtx_version or "1.7.1.116")
LOAD_STEPS = ("refit_from_store", "runtime_cache_reused", *selftest.MODE_STEPS)


class OrtComputingFakeTrtRuntime(RecordingFakeTrtRuntime):
    """The named FAKE of the TRT-RTX runtime, whose execute() answers with ONNX Runtime on the demo model."""

    def __init__(self, manifest, model_path: Path) -> None:
        super().__init__(manifest, accept_cache=0)  # takes the first runtime cache offered, as TRT-RTX does
        self.ort = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def execute(self, context, inputs, profile):
        super().execute(context, inputs, profile)
        return dict(zip([o.name for o in self.ort.get_outputs()], self.ort.run(None, dict(inputs))))


class FakeWeightlessBuild:
    """A FAKE of the weightless build (it needs a GPU): a real weightful TRT-RTX engine built on the CPU for SM 8.9."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.calls = fail, 0

    def __call__(self, bundle_dir: Path, manifest, workdir: Path) -> bytes:
        self.calls += 1
        if self.fail:
            raise EngineBuildError("the fake build was told to fail")
        return real_engine(bundle_dir, 89)


def _fake_run(work: Path, fake_cls=OrtComputingFakeTrtRuntime, build=None):
    """run_selftest with the RTX 4090 probe, one fake TRT-RTX runtime per load (kept in the list), the fake build."""
    fakes: list[RecordingFakeTrtRuntime] = []

    def trt_runtime(device: int) -> RecordingFakeTrtRuntime:
        m, _ = read_manifest(work / "bundle")
        fake = fake_cls(m, work / "demo_classifier.onnx") if fake_cls is OrtComputingFakeTrtRuntime else fake_cls(m)
        fakes.append(fake)
        return fake

    run = functools.partial(
        selftest.run_selftest,
        workdir=work,
        probe=lambda: RTX4090_MACHINE,
        trt_runtime=trt_runtime,
        build_weightless=build or FakeWeightlessBuild(),
    )
    return run, fakes


def test_the_whole_sequence_through_the_named_fakes_via_the_cli(tmp_path, monkeypatch) -> None:
    build = FakeWeightlessBuild()
    run, fakes = _fake_run(tmp_path / "work", build=build)
    monkeypatch.setattr(selftest, "run_selftest", lambda device=None: run(device=device))
    res = CliRunner().invoke(main, ["doctor", "--selftest"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["verdict"] == "passed" and report["exit_code"] == 0 and report["reason"] is None
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == list(selftest.STEPS)
    assert all(s["status"] == "ok" and s["seconds"] is not None for s in steps.values()), steps
    assert report["machine"]["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090" and report["gpu"]["sm"] == 89
    assert report["versions"]["tensorrt_rtx"] == RTX4090_MACHINE.trt_rtx_version
    assert report["versions"]["driver"] == "580.95.05" and report["versions"]["trtx_runtime"]
    # the build: called once; its engine became the bundle's only engine, weightless for this SM
    assert build.calls == 1 and steps["build_weightless"]["detail"]["sm"] == 89
    m, _ = read_manifest(tmp_path / "work" / "bundle")
    assert [(e.kind, e.compute_capabilities) for e in m.engines] == [("weightless", (89,))]
    # every load: that engine on TRT-RTX, refit, compared with ONNX Runtime over three runs
    for name in LOAD_STEPS:
        assert steps[name]["max_abs_diff"] == 0.0
        assert steps[name]["detail"]["engine"]["kind"] == "weightless"
        assert steps[name]["detail"]["engine"]["weights_from"] in ("device", "host")
    assert len(fakes) == len(LOAD_STEPS)
    for fake in fakes:
        names = fake.names_called()
        assert names.index("deserialize") < names.index("refit") < names.index("create_context")
        assert names.count("execute") == 3 and names[-1] == "release"
    # the runtime cache: saved by the first load's close(), offered to and deserialized by the second
    assert steps["refit_from_store"]["detail"]["runtime_cache"] is None
    assert steps["refit_from_store"]["detail"]["runtime_cache_saved_bytes"] == len(b"serialized kernels")
    assert fakes[0].caches_offered == [] and fakes[1].caches_offered == [b"serialized kernels"]
    assert steps["runtime_cache_reused"]["detail"]["runtime_cache"].startswith("user cache ")
    # each specialization strategy with CUDA graphs on and off, in that order
    contexts = [c[1:3] for f in fakes for c in f.calls if c[0] == "create_context"]
    assert contexts == [("lazy", True), ("lazy", True)] + [
        (s, g) for g in (True, False) for s in selftest.SPECIALIZATIONS
    ]
    assert "selftest" not in res.stderr or "passed" in res.stderr


def test_a_wrong_output_fails_its_steps_with_exit_1(tmp_path) -> None:
    # The plain recording fake echoes its input: every comparison with ONNX Runtime must catch it.
    run, fakes = _fake_run(tmp_path / "work", fake_cls=RecordingFakeTrtRuntime)
    report = run()
    assert report.verdict == "failed" and report.exit_code == 1
    steps = {s.name: s for s in report.steps}
    assert [steps[n].status for n in ("bundle_demo_model", "onnxruntime_reference", "build_weightless")] == ["ok"] * 3
    assert steps["refit_from_store"].status == "failed" and "expected shape (2, 10)" in steps["refit_from_store"].error
    assert steps["runtime_cache_reused"].status == "skipped"  # it needs the first load to have passed
    assert all(steps[n].status == "failed" for n in selftest.MODE_STEPS)
    assert report.reason.startswith(f"{1 + len(selftest.MODE_STEPS)} step(s) failed: refit_from_store")
    json.dumps(report.to_dict())


def test_a_failed_build_skips_every_load_with_exit_1(tmp_path) -> None:
    run, fakes = _fake_run(tmp_path / "work", build=FakeWeightlessBuild(fail=True))
    report = run()
    assert report.exit_code == 1 and fakes == []
    steps = {s.name: s for s in report.steps}
    assert steps["build_weightless"].status == "failed"
    assert "EngineBuildError: the fake build was told to fail" in steps["build_weightless"].error
    assert steps["build_weightless"].detail["raised_at"].startswith("test_selftest.py:")
    assert all(steps[n].status == "skipped" and "build_weightless" in steps[n].error for n in LOAD_STEPS)


@pytest.mark.parametrize(
    "where",
    [
        machine(problem="no NVIDIA driver found (libcuda could not be loaded)"),
        machine(gpu(sm=90, name="NVIDIA H100 80GB HBM3", pci=0x2330)),
    ],
    ids=["no-driver", "hopper"],
)
def test_where_trt_rtx_cannot_run_it_says_why_with_exit_3(tmp_path, where) -> None:
    built = FakeWeightlessBuild()
    report = selftest.run_selftest(workdir=tmp_path / "w", probe=lambda: where, build_weightless=built)
    assert report.verdict == "cannot_run" and report.exit_code == 3 == selftest.EXIT_CANNOT_RUN
    why = where.problem or unsupported_reason(where.gpus[0])
    assert why and report.reason == f"TensorRT for RTX cannot run on this machine: {why}"
    assert [s.name for s in report.steps] == list(selftest.STEPS)
    assert {s.status for s in report.steps} == {"skipped"} and built.calls == 0
    assert not (tmp_path / "w").exists(), "nothing is written where it cannot run"


def test_a_device_this_machine_lacks_cannot_run(tmp_path) -> None:
    report = selftest.run_selftest(workdir=tmp_path / "w", device=3, probe=lambda: RTX4090_MACHINE)
    assert report.exit_code == 3 and report.reason.endswith("no GPU with index 3 (found: 0)")


@pytest.mark.skipif(WHY_NOT_HERE is None, reason="this machine has a GPU TensorRT for RTX supports: it can run")
def test_doctor_selftest_cannot_run_on_this_machine() -> None:
    res = CliRunner().invoke(main, ["doctor", "--selftest"])
    assert res.exit_code == 3, res.output
    report = json.loads(res.stdout)
    assert report["verdict"] == "cannot_run" and report["exit_code"] == 3
    assert report["reason"] == f"TensorRT for RTX cannot run on this machine: {WHY_NOT_HERE}"
    assert report["machine"] == HERE.to_dict()
    assert res.stderr.strip().splitlines() == [f"selftest cannot run here: {report['reason']}"]


def test_doctor_help_documents_the_selftest() -> None:
    res = CliRunner().invoke(main, ["doctor", "--help"])
    assert res.exit_code == 0 and "--selftest" in res.output and "cannot_run" in res.output
    res = CliRunner().invoke(main, ["doctor", "--selftest", "."])
    assert res.exit_code == 2 and "takes no BUNDLE" in res.output


@pytest.mark.rtx_gpu
@pytest.mark.skipif(WHY_NOT_HERE is not None, reason=f"needs a GPU TensorRT for RTX supports: {WHY_NOT_HERE}")
def test_selftest_on_a_real_rtx_gpu() -> None:  # pragma: no cover - GPU only
    res = CliRunner().invoke(main, ["doctor", "--selftest"])
    report = json.loads(res.stdout)
    assert res.exit_code == 0 and report["verdict"] == "passed", json.dumps(report, indent=2)
    assert all(np.isfinite(s["max_abs_diff"]) for s in report["steps"] if s["name"] in LOAD_STEPS)
