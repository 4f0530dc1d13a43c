"""farm-job: refusing machines TRT-RTX cannot serve, the warm-up plan, the part format, and the job's bookkeeping.

The job's GPU work (weightless build, EAGER warm-up, cache serialization) cannot run here: a fake named
``FakeGpuRuntimeForTests`` stands in for it, and ``test_farm_job_on_a_real_rtx_gpu`` runs the real thing
where a GPU TensorRT for RTX supports is present (skipped elsewhere, saying why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_merge import make_bundle, real_engine

from bundler.bundle_io import verify_bundle
from bundler.cli import main
from bundler.config import ConfigError
from bundler.coverage import coverage
from bundler.farm import (
    EXIT_UNSERVABLE,
    UnservableMachineError,
    check_servable,
    farm_settings,
    parse_warmup_arg,
    run_farm_job,
    warmup_plan,
)
from bundler.merge import merge_parts
from bundler.part import PART_SCHEMA_VERSION, Part, read_part
from runtime_shim.errors import BundleError, MachineError, ManifestError
from runtime_shim.machine import Gpu, Machine, probe, trt_rtx_supports
from runtime_shim.manifest import Profile, ShapeRange, read_manifest

REPO = Path(__file__).resolve().parent.parent


def _servable_here() -> bool:
    m = probe()
    return not m.problem and bool(m.gpus) and trt_rtx_supports(m.gpus[0].sm) and m.driver_problem() is None


SERVABLE = _servable_here()


def gpu(sm: int = 89, name: str = "NVIDIA GeForce RTX 4090", index: int = 0, pci: int = 0x2684) -> Gpu:
    return Gpu(
        index=index,
        name=name,
        pci_device_id=pci,
        uuid=f"GPU-{index:08d}-0000-0000-0000-000000000000",
        sm=sm,
        total_memory=24 << 30,
    )


def machine(*gpus: Gpu, version: str = "1.7.1.116", problem: str | None = None, driver_cuda: int = 13000) -> Machine:
    return Machine(
        os="linux",
        platform="linux_x86_64",
        cpu_arch="x86_64",
        python="3.11",
        trt_rtx_version=version,
        cuda_flavour="cu13",
        driver_version="580.95.05",
        driver_cuda_version=driver_cuda,
        gpus=gpus,
        problem=problem,
    )


class FakeGpuRuntimeForTests:
    """Stands in for the GPU work (no GPU here): real engine bytes from the CPU builder, an opaque cache blob."""

    def __init__(self, engine: bytes, fail_warm: bool = False) -> None:
        self.engine, self.fail_warm, self.builds, self.overlays = engine, fail_warm, 0, []

    def build_weightless(self, bundle_dir, manifest, workdir):
        self.builds += 1
        return self.engine

    def warm(self, bundle_dir, engine_sha256, runs, rounds, workdir):
        overlay, _ = read_manifest(bundle_dir)
        self.overlays.append(overlay)
        assert [p for p in verify_bundle(bundle_dir) if p.fatal] == []
        if self.fail_warm:
            raise BundleError("TRT-RTX failed during the warm-up (fake)")
        done = tuple(replace(r, first_run_s=0.5, rounds=rounds) for r in runs)
        return (
            b"fake runtime cache for " + engine_sha256.encode(),
            done,
            {"load_s": 0.1, "warmup_s": 1.0, "serialize_s": 0.01},
        )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path)


# --------------------------------------------------------------------------- machines TRT-RTX cannot serve
@pytest.mark.skipif(SERVABLE, reason="this machine has a GPU TensorRT for RTX supports: it is not refused")
def test_farm_job_refuses_this_machine_cli(tmp_path: Path, bundle: Path) -> None:
    listing = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, ["farm-job", str(bundle), "-o", str(tmp_path / "part")])
    assert res.exit_code == EXIT_UNSERVABLE == 3, res.output
    assert "ERROR this machine cannot serve TensorRT for RTX" in res.stderr and "(found: " in res.stderr
    assert "hint:" in res.stderr and "exit code 3" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "nothing may be written, not even PART_DIR"


@pytest.mark.skipif(SERVABLE, reason="this machine has a GPU TensorRT for RTX supports: it is not refused")
def test_farm_job_refuses_this_machine_subprocess(tmp_path: Path, bundle: Path) -> None:
    listing = sorted(p.name for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from bundler.cli import main; main()",
            "farm-job",
            str(bundle),
            "-o",
            str(tmp_path / "part"),
            "--warmup",
            "x=8x64",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 3, proc.stderr
    assert "cannot serve TensorRT for RTX" in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.mark.parametrize(
    "m, expected",
    [
        (machine(problem="no NVIDIA driver found (libcuda could not be loaded)"), "no NVIDIA driver found"),
        (machine(), "no GPU found"),
        (machine(gpu(90, "NVIDIA H100 80GB HBM3", pci=0x2330)), r"compute capability 9\.0 \(Hopper"),
        (machine(gpu(100, "NVIDIA B200")), r"compute capability 10\.0"),
        (machine(gpu(89), driver_cuda=12020), "needs a driver for CUDA 13.0"),
    ],
)
def test_unservable_machines_say_what_was_found(m: Machine, expected: str) -> None:
    with pytest.raises(UnservableMachineError, match=expected) as e:
        check_servable(m)
    assert e.value.exit_code == 3 and "found: linux/linux_x86_64" in str(e.value)


def test_supported_gpu_behind_an_unsupported_one_is_named_in_the_hint() -> None:
    with pytest.raises(UnservableMachineError) as e:
        check_servable(machine(gpu(90, "NVIDIA H100"), gpu(89, index=1)))
    assert "CUDA_VISIBLE_DEVICES=1" in e.value.hint


def test_servable_machine_serves_device_0() -> None:
    assert check_servable(machine(gpu(120, "NVIDIA GeForce RTX 5090"), gpu(89, index=1))).sm == 120
    with pytest.raises(MachineError, match="tensorrt_rtx is not installed"):
        check_servable(replace(machine(gpu(89)), trt_rtx_version=None))


# --------------------------------------------------------------------------- the job, GPU work faked
def test_farm_job_writes_a_part_that_merges(tmp_path: Path, bundle: Path) -> None:
    manifest, _ = read_manifest(bundle)
    fake = FakeGpuRuntimeForTests(real_engine(bundle, 89))
    m = machine(gpu(89), version=manifest.trt_rtx.version)
    result = run_farm_job(
        bundle, tmp_path / "part", warmups=[{"x": (8, 64)}], rounds=3, probe=lambda: m, gpu_backend=fake
    )
    assert result.engine_built and fake.builds == 1
    # The shim was handed a bundle with only the new engine and no cache, so it must load that one, from scratch.
    (overlay,) = fake.overlays
    assert [e.file.sha256 for e in overlay.engines] == [result.part.engine.file.sha256] and overlay.runtime_caches == ()
    part, warnings = read_part(tmp_path / "part")
    assert warnings == [] and part == result.part
    key = part.runtime_cache.key
    assert (key.os, key.gpu_name, key.pci_device_id, key.sm, key.driver_version, key.cuda_flavour, key.cig) == (
        "linux",
        "NVIDIA GeForce RTX 4090",
        0x2684,
        89,
        "580.95.05",
        "cu13",
        False,
    )
    assert key.trt_rtx_version == manifest.trt_rtx.version
    assert [(w.profile, dict(w.shapes), w.rounds) for w in part.warmup] == [(0, {"x": (8, 64)}, 3)]
    assert {"probe_s", "build_s", "load_s", "warmup_s", "serialize_s", "total_s"} <= set(part.timings)
    assert part.engine.kind == "weightless" and part.engine.compute_capabilities == (89,)
    assert sorted(
        p.relative_to(tmp_path / "part").as_posix() for p in (tmp_path / "part").rglob("*") if p.is_file()
    ) == sorted(["part.json", part.engine.file.path, part.runtime_cache.file.path])

    merge_parts(bundle, [tmp_path / "part"])
    assert [p for p in verify_bundle(bundle) if p.fatal] == []
    row = next(r for r in coverage(read_manifest(bundle)[0]).rows if (r.platform, r.sm) == ("linux_x86_64", 89))
    assert row.engine == "weightless" and row.caches[0].key.gpu_name == "NVIDIA GeForce RTX 4090"

    # A second runner with the same SM reuses the farm engine now in the bundle.
    fake2 = FakeGpuRuntimeForTests(b"unused")
    m2 = machine(gpu(89, "NVIDIA GeForce RTX 4080", pci=0x2704), version=manifest.trt_rtx.version)
    again = run_farm_job(bundle, tmp_path / "part2", probe=lambda: m2, gpu_backend=fake2)
    assert not again.engine_built and fake2.builds == 0 and again.part.engine is None
    assert again.part.runtime_cache.engines == (part.engine.file.sha256,)
    assert [r.shapes["x"] for r in again.part.warmup] == [(1, 64), (4, 64), (16, 64)]  # profile min, opt, max


def test_failed_job_writes_nothing(tmp_path: Path, bundle: Path) -> None:
    manifest, _ = read_manifest(bundle)
    m = machine(gpu(89), version=manifest.trt_rtx.version)
    with pytest.raises(BundleError, match="warm-up"):
        run_farm_job(
            bundle, tmp_path / "out" / "part", probe=lambda: m, gpu_backend=FakeGpuRuntimeForTests(b"e", fail_warm=True)
        )
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_existing_part_dir_is_never_overwritten(tmp_path: Path, bundle: Path) -> None:
    manifest, _ = read_manifest(bundle)
    m = machine(gpu(89), version=manifest.trt_rtx.version)
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="never overwrites"):
        run_farm_job(bundle, tmp_path / "part", probe=lambda: m, gpu_backend=FakeGpuRuntimeForTests(b"e"))
    assert [p.name for p in (tmp_path / "part").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # CI systems often create the folder first
    run_farm_job(
        bundle, tmp_path / "empty", probe=lambda: m, gpu_backend=FakeGpuRuntimeForTests(real_engine(bundle, 89))
    )
    assert (tmp_path / "empty" / "part.json").is_file()


def test_other_trt_rtx_version_on_the_runner_is_refused(tmp_path: Path, bundle: Path) -> None:
    m = machine(gpu(89), version="1.6.0.1")
    with pytest.raises(MachineError, match=r"1\.6\.0\.1.*version-locked") as e:
        run_farm_job(bundle, tmp_path / "part", probe=lambda: m, gpu_backend=FakeGpuRuntimeForTests(b"e"))
    assert "tensorrt-rtx==" in e.value.hint and not (tmp_path / "part").exists()


# --------------------------------------------------------------------------- warm-up plan
def test_warmup_plan(bundle: Path) -> None:
    manifest, _ = read_manifest(bundle)
    assert [r.shapes["x"] for r in warmup_plan(manifest)] == [(1, 64), (4, 64), (16, 64)]
    assert [r.shapes["x"] for r in warmup_plan(manifest, [parse_warmup_arg("x=8x64")])] == [(8, 64)]
    two = replace(
        manifest,
        profiles=manifest.profiles + (Profile(shapes={"x": ShapeRange(min=(8, 64), opt=(32, 64), max=(64, 64))}),),
    )
    assert [(r.profile, r.shapes["x"]) for r in warmup_plan(two, [{"x": (8, 64)}, {"x": (40, 64)}])] == [
        (0, (8, 64)),
        (1, (8, 64)),
        (1, (40, 64)),
    ]
    with pytest.raises(BundleError, match="fits no optimization profile"):
        warmup_plan(manifest, [{"x": (99, 64)}])
    with pytest.raises(BundleError, match="no input 'y'"):
        warmup_plan(manifest, [{"y": (1, 64)}])
    with pytest.raises(BundleError, match="rank 2"):
        warmup_plan(manifest, [{"x": (1, 64, 1)}])


@pytest.mark.parametrize("arg", ["x", "=1x2", "x=1,2", "x=1x2,y"])
def test_bad_warmup_args(arg: str) -> None:
    with pytest.raises(ConfigError, match="--warmup"):
        parse_warmup_arg(arg)


def test_farm_settings() -> None:
    s = farm_settings({"targets": ["rtx4090-linux"], "rounds": 3, "warmup": [{"x": "8x64"}]}, source="b.toml")
    assert s.targets == ("rtx4090-linux",) and s.rounds == 3 and s.warmup == ({"x": (8, 64)},)
    for bad, msg in (
        ({"rounds": 0}, "farm.rounds"),
        ({"warmup": [{"x": 8}]}, r"farm.warmup\[0\]"),
        ({"targets": "rtx"}, "farm.targets"),
        ({"gpu": 1}, "farm.gpu: unknown key"),
    ):
        with pytest.raises(ConfigError, match=msg):
            farm_settings(bad, source="b.toml")


# --------------------------------------------------------------------------- part format
def _sample_part(tmp_path: Path, bundle: Path) -> Path:
    m = machine(gpu(89), version=read_manifest(bundle)[0].trt_rtx.version)
    run_farm_job(
        bundle, tmp_path / "part", probe=lambda: m, gpu_backend=FakeGpuRuntimeForTests(real_engine(bundle, 89))
    )
    return tmp_path / "part"


def test_part_format_versioning(tmp_path: Path, bundle: Path) -> None:
    path = _sample_part(tmp_path, bundle)
    data = json.loads((path / "part.json").read_text())
    assert data["kind"] == "trtx-bundler-part" and data["schema_version"] == PART_SCHEMA_VERSION
    part, _ = Part.from_dict(data, source="p")
    assert json.loads(part.to_json()) == data
    part, warnings = Part.from_dict({**data, "gpu_clock": 1}, source="p")
    assert warnings == ["gpu_clock: unknown key ignored (written by a newer trtx-bundler?)"]
    with pytest.raises(ManifestError, match="schema_version 2 is newer"):
        Part.from_dict({**data, "schema_version": 2}, source="p")
    with pytest.raises(ManifestError, match="not a farm part manifest"):
        Part.from_dict(json.loads((bundle / "manifest.json").read_text()), source="p")
    with pytest.raises(ManifestError, match=r"p: runtime_cache\.key\.sm: expected an integer"):
        Part.from_dict(
            {**data, "runtime_cache": {**data["runtime_cache"], "key": {**data["runtime_cache"]["key"], "sm": "89"}}},
            source="p",
        )


# --------------------------------------------------------------------------- the real thing
@pytest.mark.rtx_gpu
@pytest.mark.skipif(
    not SERVABLE,
    reason="needs a GPU TensorRT for RTX supports (SM 7.5/8.x/12.x) as CUDA device 0: "
    "weightless builds, EAGER warm-up and cache serialization run only there",
)
def test_farm_job_on_a_real_rtx_gpu(tmp_path: Path, bundle: Path) -> None:  # pragma: no cover - GPU only
    res = CliRunner().invoke(
        main, ["farm-job", str(bundle), "-o", str(tmp_path / "part"), "--warmup", "x=8x64", "--json"]
    )
    assert res.exit_code == 0, res.output
    part, _ = read_part(tmp_path / "part")
    assert part.engine is not None and part.runtime_cache.file.size > 0
    assert all(w.rounds == 2 and w.first_run_s is not None for w in part.warmup)
    merge_parts(bundle, [tmp_path / "part"])
    assert [p for p in verify_bundle(bundle) if p.fatal] == []


def test_farm_job_on_a_model_trt_rtx_cannot_parse_stops_before_building(tmp_path: Path) -> None:
    """The verdict recorded at build time stops the job at once, naming the ops, instead of a parse failure of a
    temporary copy after the GPU work started."""
    import models

    from bundler.build import build_bundle
    from bundler.config import make_options

    src = models.make_unsupported(tmp_path / "m")
    bundle_dir = tmp_path / "b"
    build_bundle(src, bundle_dir, options=make_options(shapes=("x=1x3x3:4x3x3:16x3x3",), weightful=False))
    fake = FakeGpuRuntimeForTests(b"unused")
    with pytest.raises(BundleError) as e:
        run_farm_job(bundle_dir, tmp_path / "part", probe=lambda: machine(gpu(89)), gpu_backend=fake)
    assert "manifest.json" in str(e.value) and models.UNSUPPORTED_OP in str(e.value)
    assert "ONNX Runtime fallback" in (e.value.hint or "")
    assert fake.builds == 0 and not (tmp_path / "part").exists()


@pytest.mark.skipif(SERVABLE, reason="this machine has a GPU TensorRT for RTX supports: it is not refused")
def test_farm_job_takes_the_archive_too(tmp_path: Path, bundle: Path) -> None:
    """A .trtx archive is extracted (checked) for the job; here the machine is then refused like for a directory,
    and a damaged archive is one clean error. Nothing is left behind either way."""
    from bundler.archive import pack_bundle

    archive = pack_bundle(bundle, tmp_path / "b.trtx").path
    listing = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, ["farm-job", str(archive), "-o", str(tmp_path / "part")])
    assert res.exit_code == EXIT_UNSERVABLE, res.output
    assert "ERROR this machine cannot serve TensorRT for RTX" in res.stderr
    damaged = tmp_path / "damaged.trtx"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a pinned file's bytes: its sha256 no longer matches
    damaged.write_bytes(data)
    listing = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, ["farm-job", str(damaged), "-o", str(tmp_path / "part")])
    assert res.exit_code == 1 and "Traceback" not in res.output and str(damaged) in res.stderr, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
