"""farm-job and merge on a bundle of several models: a part per model, each merged into its own model.

Bundles are real (build_bundle with several ModelSpecs, real ONNX models). The GPU work of a farm job cannot run
here: ``FakeGpuRuntimeForTests`` stands in for it, as in test_farm.py, per model (one test has it build a real
TRT-RTX engine on the CPU from each model's skeleton and weights, as the real farm does on its GPU).
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from models import UNSUPPORTED_PROFILE, make_conv, make_mlp, make_unsupported, shape_args
from onnx import numpy_helper
from test_farm import SERVABLE, gpu, machine
from test_merge import RTX4090, RTX5090, fatal, snapshot

import bundler.cli.farm as cli_farm
from bundler.build import ModelSpec, build_bundle
from bundler.bundle_io import verify_bundle
from bundler.cli import main
from bundler.config import make_options, parse_shape_args
from bundler.coverage import coverage_by_model, render
from bundler.farm import EXIT_UNSERVABLE, run_farm_job
from bundler.farm_warmup import warmups_by_model
from bundler.merge import MergeError, merge_parts
from bundler.part import Part, PartStage, base_sha256, model_dirs, read_parts
from runtime_shim.errors import BackendUnavailableError, BundleError, EngineBuildError, ManifestError
from runtime_shim.fsutil import sha256_bytes
from runtime_shim.manifest import CacheKey, Engine, FileRef, RuntimeCache, read_bundle_manifest

MLP_SHAPE = "x=1x64:4x64:16x64"


def fine_tune(src: Path, dest: Path, seed: int = 7) -> Path:
    """The same model with other last-layer weights (fc2): what a fine-tune of one model changes."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name.startswith("fc2."):
            arr = numpy_helper.to_array(init)
            init.CopyFrom(
                numpy_helper.from_array(
                    np.random.default_rng(seed).standard_normal(arr.shape).astype(arr.dtype), init.name
                )
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dest))
    return dest


def multi_bundle(tmp: Path, name: str = "bundle", *, third: bool = False, unsupported: bool = False) -> Path:
    """det and rec (two fine-tunes of one MLP sharing fc1), optionally cls (a conv net) or bad (TRT-RTX refuses it)."""
    base = make_mlp(tmp / f"{name}-src")
    specs = [
        ModelSpec(source=base, name="det", profiles=parse_shape_args([MLP_SHAPE])),
        ModelSpec(
            source=fine_tune(base, tmp / f"{name}-src" / "rec.onnx"), name="rec", profiles=parse_shape_args([MLP_SHAPE])
        ),
    ]
    if third:
        conv = make_conv(tmp / f"{name}-conv")
        specs.append(
            ModelSpec(source=conv, name="cls", profiles=parse_shape_args(["input=1x3x8x8:1x3x16x16:2x3x32x32"]))
        )
    if unsupported:
        bad = make_unsupported(tmp / f"{name}-bad")
        specs.append(ModelSpec(source=bad, name="bad", profiles=parse_shape_args(shape_args(UNSUPPORTED_PROFILE))))
    return build_bundle(None, tmp / name, options=make_options(weightful=False), models=specs).bundle_dir


class FakeGpuRuntimeForTests:
    """Stands in for the GPU work (no GPU here), per model: engine bytes (a real CPU-built TRT-RTX engine with
    ``real``), an opaque cache blob; ``fail`` names models whose build fails."""

    def __init__(self, *, real: bool = False, fail: tuple[str, ...] = ()) -> None:
        self.real, self.fail, self.builds, self.overlays = real, fail, [], []

    def build_weightless(self, bundle_dir, manifest, workdir):
        name = manifest.model.name
        self.builds.append(name)
        if name in self.fail:
            raise EngineBuildError(f"TensorRT for RTX failed to build model {name!r} (fake)")
        if not self.real:
            return f"weightless engine of {name}".encode()
        from runtime_shim.fallback import model_on_disk
        from runtime_shim.trt.build import BuildRequest, build_engine
        from runtime_shim.user_cache import UserCache

        with model_on_disk(manifest, bundle_dir, UserCache("tests", workdir / "uc")) as onnx_path:
            profiles = [p.triples() for p in manifest.profiles]
            return build_engine(BuildRequest(onnx_path=str(onnx_path), profiles=profiles, compute_capabilities=[89]))

    def warm(self, bundle_dir, engine_sha256, runs, rounds, workdir):
        overlay, _warnings, _sha = read_bundle_manifest(bundle_dir)
        (model,) = overlay.models  # the shim loads one model, with only the farm's engine and no cache
        self.overlays.append(model)
        assert fatal(verify_bundle(bundle_dir)) == []
        done = tuple(replace(r, first_run_s=0.5, rounds=rounds) for r in runs)
        cache = f"fake runtime cache of {model.name} for ".encode() + engine_sha256.encode()
        return cache, done, {"load_s": 0.1, "warmup_s": 1.0, "serialize_s": 0.01}


def farm(bundle: Path, out: Path, fake: FakeGpuRuntimeForTests, g=None, **kwargs):
    version = read_bundle_manifest(bundle)[0].trt_rtx.version
    m = machine(g or gpu(89), version=version)
    return run_farm_job(bundle, out, probe=lambda: m, gpu_backend=fake, **kwargs)


def models_of(bundle: Path) -> dict[str, dict]:
    return {m["name"]: m for m in json.loads((bundle / "manifest.json").read_text())["models"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return multi_bundle(tmp_path_factory.mktemp("multi"))


@pytest.fixture
def bundle(built: Path, tmp_path: Path) -> Path:
    """A fresh copy of the module's two-model bundle (building one takes a while)."""
    import shutil

    return Path(shutil.copytree(built, tmp_path / "bundle"))


def make_model_part(
    part_dir: Path,
    bundle: Path,
    model: str,
    *,
    gpu=RTX4090,
    cache: bytes | None = None,
    created: int = 1_700_000_000,
    engine: bytes | None = None,
) -> Path:
    """A part for one model, as farm-job writes it (engine: bytes of a new one, else the model's first engine)."""
    whole, _w, sha = read_bundle_manifest(bundle)
    view = whole.view(model)
    name, pci, sm = gpu
    engine = engine if engine is not None or view.engines else f"engine {model} {sm}".encode()
    new_engine = None
    if engine is not None:
        new_engine = Engine(
            kind="weightless",
            platform="linux_x86_64",
            compute_capabilities=(sm,),
            trt_rtx_version=whole.trt_rtx.version,
            file=FileRef.for_content("engines", sha256_bytes(engine), len(engine)),
            built_by={"tool": "test"},
        )
    engine_sha = new_engine.file.sha256 if new_engine else view.engines[0].file.sha256
    cache = cache if cache is not None else f"cache {model} {name}".encode()
    key = CacheKey(
        os="linux",
        gpu_name=name,
        pci_device_id=pci,
        sm=sm,
        driver_version="580.95",
        cuda_flavour=whole.trt_rtx.cuda_flavour,
        trt_rtx_version=whole.trt_rtx.version,
    )
    part = Part(
        bundle_manifest_sha256=sha,
        bundle_base_sha256=base_sha256(view),
        model=model,
        engine=new_engine,
        runtime_cache=RuntimeCache(
            key=key,
            engines=(engine_sha,),
            created=created,
            file=FileRef.for_content("caches", sha256_bytes(cache), len(cache)),
        ),
        timings={"total_s": 1.0},
        created=created,
    )
    with PartStage(part_dir) as stage:
        stage.add(part, {"engines": engine or b"", "caches": cache})
        stage.commit()
    return part_dir


# --------------------------------------------------------------------------- farm-job, GPU work faked
def test_farm_job_makes_a_part_per_model_that_merges(tmp_path: Path, bundle: Path) -> None:
    fake = FakeGpuRuntimeForTests(real=True)
    result = farm(bundle, tmp_path / "part", fake, warmups=[{"x": (8, 64)}], rounds=3)
    assert [j.model for j in result.models] == ["det", "rec"] and result.failed == ()
    assert fake.builds == ["det", "rec"]
    # Each warm-up loaded one model, with only its new engine and no cache.
    assert [m.name for m in fake.overlays] == ["det", "rec"]
    assert all(len(m.engines) == 1 and m.runtime_caches == () for m in fake.overlays)
    whole = read_bundle_manifest(bundle)[0]
    parts = read_parts(tmp_path / "part")
    assert [(p.name, part.model) for p, part, _ in parts] == [("det", "det"), ("rec", "rec")]
    for (path, part, warnings), job in zip(parts, result.models):
        assert warnings == [] and part == job.part and job.part_dir == path
        assert part.bundle_base_sha256 == base_sha256(whole.view(part.model))
        assert [(w.profile, dict(w.shapes), w.rounds) for w in part.warmup] == [(0, {"x": (8, 64)}, 3)]
        assert {"probe_s", "build_s", "load_s", "warmup_s", "serialize_s", "total_s"} <= set(part.timings)
    assert parts[0][1].engine.file.sha256 != parts[1][1].engine.file.sha256  # two models, two engines
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["det", "rec"]

    report = merge_parts(bundle, [tmp_path / "part"])
    assert fatal(verify_bundle(bundle)) == []
    assert [a.model for a in report.engines_added] == ["det", "rec"] == [a.model for a in report.caches_added]
    assert report.parts == (str(tmp_path / "part" / "det"), str(tmp_path / "part" / "rec"))
    after = read_bundle_manifest(bundle)[0]
    for name, (_p, part, _w) in zip(("det", "rec"), parts):
        view = after.view(name)
        assert [e.file.sha256 for e in view.engines] == [part.engine.file.sha256]
        assert [c.file.sha256 for c in view.runtime_caches] == [part.runtime_cache.file.sha256]
        assert (
            (bundle / view.runtime_caches[0].file.path)
            .read_bytes()
            .startswith(f"fake runtime cache of {name}".encode())
        )
    cov = coverage_by_model(after)
    assert list(cov) == ["det", "rec"]
    for name, c in cov.items():
        row = next(r for r in c.rows if (r.platform, r.sm) == ("linux_x86_64", 89))
        assert c.model == name and row.engine == "weightless" and row.caches[0].key.gpu_name == RTX4090[0]
        assert next(r for r in c.rows if r.sm == 86).engine == "build"
    assert render(cov["rec"].to_dict(), with_model=True)[0].startswith("coverage of model rec (TensorRT for RTX")
    assert render(cov["rec"].to_dict())[0].startswith("coverage (TensorRT for RTX")

    # A second runner with the same SM reuses each model's farm engine now in the bundle.
    fake2 = FakeGpuRuntimeForTests()
    again = farm(bundle, tmp_path / "part2", fake2, g=gpu(89, "NVIDIA GeForce RTX 4080", pci=0x2704))
    assert fake2.builds == [] and [j.engine_built for j in again.models] == [False, False]
    for job, (_p, part, _w) in zip(again.models, parts):
        assert job.part.engine is None and job.part.runtime_cache.engines == (part.engine.file.sha256,)
    merge_parts(bundle, [tmp_path / "part2"])
    assert [len(m["runtime_caches"]) for m in models_of(bundle).values()] == [2, 2]
    assert fatal(verify_bundle(bundle)) == []


def test_one_model_failing_keeps_the_other_models_parts(tmp_path: Path) -> None:
    """bad: TRT-RTX's parser refused it at build (its verdict says so): no build is tried. rec: its build fails.
    det's part is still written, and the job reports each model."""
    bundle = multi_bundle(tmp_path, unsupported=True)
    assert models_of(bundle)["bad"]["parse"]["status"] == "failed"
    fake = FakeGpuRuntimeForTests(fail=("rec",))
    result = farm(bundle, tmp_path / "part", fake)
    assert fake.builds == ["det", "rec"]  # never "bad"
    assert [(j.model, j.error is None) for j in result.models] == [("det", True), ("rec", False), ("bad", False)]
    assert "parser refused model 'bad'" in str(result.models[2].error)
    assert [p.name for p in (tmp_path / "part").iterdir()] == ["det"]
    assert [part.model for _p, part, _w in read_parts(tmp_path / "part")] == ["det"]
    merge_parts(bundle, [tmp_path / "part"])
    assert [len(m["runtime_caches"]) for m in models_of(bundle).values()] == [1, 0, 0]


def test_farm_job_cli_reports_each_model(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(gpu(89), version=read_bundle_manifest(bundle)[0].trt_rtx.version)
    fake = FakeGpuRuntimeForTests(fail=("rec",))
    monkeypatch.setattr(cli_farm, "run_farm_job", functools.partial(run_farm_job, probe=lambda: m, gpu_backend=fake))
    res = CliRunner().invoke(main, ["farm-job", str(bundle), "-o", str(tmp_path / "part"), "--json"])
    assert res.exit_code == 1, res.output
    d = json.loads(res.stdout)
    assert [(x["model"], x["ok"]) for x in d["models"]] == [("det", True), ("rec", False)]
    assert d["models"][0]["part"]["bundle"]["model"] == "det" and d["models"][0]["part_dir"] == str(
        tmp_path / "part" / "det"
    )
    assert "failed to build model 'rec'" in d["models"][1]["error"]
    assert "ERROR the farm job failed for 1 of 2 models: rec:" in res.stderr and "hint: the parts of det" in res.stderr
    assert "det: building the weightless engine" in res.stderr  # progress on stderr, per model
    res = CliRunner().invoke(main, ["farm-job", str(bundle), "-o", str(tmp_path / "p2")])
    assert res.exit_code == 1
    assert res.stdout.splitlines()[0].startswith(f"model det: part {tmp_path / 'p2' / 'det'}: new weightless engine")
    assert res.stdout.splitlines()[1].startswith("model rec: FAILED: ")


def test_every_model_failing_writes_nothing(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(BundleError, match="failed for every model") as e:
        farm(bundle, tmp_path / "out" / "part", FakeGpuRuntimeForTests(fail=("det", "rec")))
    assert "det: " in str(e.value) and "rec: " in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(SERVABLE, reason="this machine has a GPU TensorRT for RTX supports: it is not refused")
def test_farm_job_refuses_this_machine_with_a_multi_model_bundle(tmp_path: Path, bundle: Path) -> None:
    listing = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, ["farm-job", str(bundle), "-o", str(tmp_path / "part"), "--warmup", "det.x=8x64"])
    assert res.exit_code == EXIT_UNSERVABLE == 3, res.output
    assert "ERROR this machine cannot serve TensorRT for RTX" in res.stderr and res.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "nothing may be written, not even PART_DIR"


# --------------------------------------------------------------------------- warm-ups per model
def test_warmups_by_model(tmp_path: Path) -> None:
    bundle = multi_bundle(tmp_path, third=True)
    whole = read_bundle_manifest(bundle)[0]
    # "x" is an input of det and rec: it warms both; cls.input names the conv net's.
    split = warmups_by_model(whole, [{"x": (8, 64)}, {"cls.input": (1, 3, 12, 12)}, {"rec.x": (2, 64)}])
    assert split == {
        "det": [{"x": (8, 64)}],
        "rec": [{"x": (8, 64)}, {"x": (2, 64)}],
        "cls": [{"input": (1, 3, 12, 12)}],
    }
    with pytest.raises(BundleError, match="no model of the bundle has an input 'y'") as e:
        warmups_by_model(whole, [{"y": (1, 64)}])
    assert "det: x; rec: x; cls: input" in e.value.hint
    fake = FakeGpuRuntimeForTests()
    result = farm(bundle, tmp_path / "part", fake, warmups=[{"det.x": (8, 64)}, {"input": (2, 3, 20, 20)}])
    plans = {j.model: [dict(w.shapes) for w in j.part.warmup] for j in result.models}
    assert plans["det"] == [{"x": (8, 64)}]
    assert plans["rec"] == [{"x": (1, 64)}, {"x": (4, 64)}, {"x": (16, 64)}]  # none given: the profile's corners
    assert plans["cls"] == [{"input": (2, 3, 20, 20)}]
    with pytest.raises(BundleError, match=r"model 'det': warm-up x=99x64 fits no optimization profile"):
        farm(bundle, tmp_path / "p2", fake, warmups=[{"det.x": (99, 64)}])
    assert not (tmp_path / "p2").exists()


# --------------------------------------------------------------------------- the PART_DIR layout
def test_model_dirs_are_portable_folder_names() -> None:
    assert model_dirs(["det", "rec.v2"]) == ["det", "rec.v2"]
    assert model_dirs(["../up", "a/b", "", "con", "nul.txt", ".hidden", "x."]) == [f"model-{i}" for i in range(7)]
    assert model_dirs(["Det", "det", "model-1"]) == ["Det", "model-1", "model-2"]  # case-blind file systems
    assert model_dirs(["a" * 65, "ok"]) == ["model-0", "ok"]


def test_read_parts_takes_either_layout(tmp_path: Path, bundle: Path) -> None:
    one = make_model_part(tmp_path / "one", bundle, "det")
    assert [(p, part.model) for p, part, _ in read_parts(one)] == [(one, "det")]
    several = tmp_path / "several"
    make_model_part(several / "rec", bundle, "rec")
    make_model_part(several / "det", bundle, "det")
    (several / "notes.txt").write_text("not a part")
    (several / "empty").mkdir()
    assert [(p.name, part.model) for p, part, _ in read_parts(several)] == [("det", "det"), ("rec", "rec")]
    (tmp_path / "none").mkdir()
    with pytest.raises(ManifestError, match="part.json: not found") as e:
        read_parts(tmp_path / "none")
    assert "one folder per model" in e.value.hint


# --------------------------------------------------------------------------- merge per model
def test_parts_of_two_runners_merge_in_one_call(tmp_path: Path, bundle: Path) -> None:
    for runner, g in (("r4090", RTX4090), ("r5090", RTX5090)):
        for model in ("det", "rec"):
            make_model_part(tmp_path / runner / model, bundle, model, gpu=g)
    res = CliRunner().invoke(main, ["merge", str(bundle), str(tmp_path / "r4090"), str(tmp_path / "r5090"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["models"] == ["det", "rec"]
    assert sorted((a["model"], a["compute_capabilities"][0]) for a in report["engines_added"]) == [
        ("det", 89),
        ("det", 120),
        ("rec", 89),
        ("rec", 120),
    ]
    assert sorted((a["model"], a["key"]["gpu_name"]) for a in report["caches_added"]) == sorted(
        (m, g[0]) for m in ("det", "rec") for g in (RTX4090, RTX5090)
    )
    assert report["conflicts"] == []  # one key in two models is two caches, not a conflict
    for name, model in models_of(bundle).items():
        for c in model["runtime_caches"]:
            assert (bundle / c["file"]["path"]).read_bytes().startswith(f"cache {name} ".encode())
    assert fatal(verify_bundle(bundle)) == []
    manifest = (bundle / "manifest.json").read_bytes()
    res = CliRunner().invoke(main, ["merge", str(bundle), str(tmp_path / "r4090")])
    assert res.exit_code == 0 and "0 engine(s), 0 cache(s) added" in res.stdout
    assert "nothing new" in res.stderr and (bundle / "manifest.json").read_bytes() == manifest


def test_merging_one_model_leaves_the_other_untouched(tmp_path: Path, bundle: Path) -> None:
    """Parts merged one model at a time: each later part was made for an earlier state of the bundle, which
    still fits (its model's base is the same), and the other model's records and files stay as they were."""
    det = make_model_part(tmp_path / "det", bundle, "det")
    rec = make_model_part(tmp_path / "rec", bundle, "rec")
    before = models_of(bundle)
    files = snapshot(bundle)
    res = CliRunner().invoke(main, ["merge", str(bundle), str(det)])
    assert res.exit_code == 0, res.output
    assert "+ engine weightless SM 8.9 linux_x86_64" in res.stdout and "for model det" in res.stdout
    after = models_of(bundle)
    assert after["rec"] == before["rec"] and after["det"] != before["det"]
    assert {k: v for k, v in snapshot(bundle).items() if k != "manifest.json"}.items() >= {
        k: v for k, v in files.items() if k != "manifest.json"
    }.items()
    report = merge_parts(bundle, [rec])
    assert any("earlier state of this bundle (same model 'rec'" in n for n in report.notes)
    final = models_of(bundle)
    assert final["det"] == after["det"] and len(final["rec"]["runtime_caches"]) == 1
    assert fatal(verify_bundle(bundle)) == []


def test_part_for_a_model_the_bundle_does_not_hold(tmp_path: Path, bundle: Path) -> None:
    other = multi_bundle(tmp_path, "other", third=True)
    part = make_model_part(tmp_path / "p", other, "cls")
    before = snapshot(bundle)
    res = CliRunner().invoke(main, ["merge", str(bundle), str(part)])
    assert res.exit_code == 1 and "hint:" in res.stderr
    msg = res.stderr.replace("\n", " ")
    assert f"{part}: made for another bundle: its part.json is for model 'cls'" in msg
    assert "holds no model of that name (its models: 'det', 'rec')" in msg
    assert snapshot(bundle) == before


def test_part_for_a_model_of_the_same_name_in_another_bundle(tmp_path: Path, bundle: Path) -> None:
    """Same model names, but rec is another fine-tune: both parts belong to the other bundle. Even det's, whose
    model is identical: the weight index all models share differs, and a part's base includes it."""
    base = make_mlp(tmp_path / "o-src")
    other = build_bundle(
        None,
        tmp_path / "other",
        options=make_options(weightful=False),
        models=[
            ModelSpec(source=base, name="det", profiles=parse_shape_args([MLP_SHAPE])),
            ModelSpec(
                source=fine_tune(base, tmp_path / "o-src" / "rec.onnx", seed=8),
                name="rec",
                profiles=parse_shape_args([MLP_SHAPE]),
            ),
        ],
    ).bundle_dir
    for model in ("det", "rec"):
        part = make_model_part(tmp_path / f"p-{model}", other, model)
        with pytest.raises(MergeError, match=f"made for another bundle.*model '{model}'"):
            merge_parts(bundle, [part])


def test_conflicts_are_per_model(tmp_path: Path, bundle: Path) -> None:
    new = tmp_path / "new"
    old = tmp_path / "old"
    for model in ("det", "rec"):
        make_model_part(
            new / model, bundle, model, cache=f"new {model}".encode(), created=2_000, engine=b"e " + model.encode()
        )
        make_model_part(
            old / model, bundle, model, cache=f"old {model}".encode(), created=1_000, engine=b"e " + model.encode()
        )
    report = merge_parts(bundle, [old, new])
    assert sorted((c.model, c.kept, c.reason) for c in report.conflicts) == [
        ("det", str(new / "det"), "newest"),
        ("rec", str(new / "rec"), "newest"),
    ]
    assert {c["model"] for c in report.to_dict()["conflicts"]} == {"det", "rec"}
    for name, model in models_of(bundle).items():
        (cache,) = model["runtime_caches"]
        assert (bundle / cache["file"]["path"]).read_bytes() == f"new {name}".encode()
    # --prefer a multi-model PART_DIR: its part wins for every model it holds.
    b2 = multi_bundle(tmp_path, "b2")
    for d, created in ((new, 2_000), (old, 1_000)):
        for model in ("det", "rec"):
            make_model_part(
                d.with_name(d.name + "2") / model,
                b2,
                model,
                cache=f"{d.name} {model}".encode(),
                created=created,
                engine=b"e",
            )
    report = merge_parts(b2, [tmp_path / "new2", tmp_path / "old2"], prefer=str(tmp_path / "old2"))
    assert {(c.model, c.kept) for c in report.conflicts} == {
        ("det", str(tmp_path / "old2" / "det")),
        ("rec", str(tmp_path / "old2" / "rec")),
    }
    assert all(c.reason == f"--prefer {tmp_path / 'old2'}" for c in report.conflicts)
    with pytest.raises(MergeError, match="--prefer"):
        merge_parts(b2, [tmp_path / "new2"], prefer=str(tmp_path / "nope"))


def test_merge_checks_each_part_of_a_part_dir(tmp_path: Path, bundle: Path) -> None:
    """A tampered part of one model stops the whole merge: nothing of the other model's part goes in either."""
    d = tmp_path / "parts"
    make_model_part(d / "det", bundle, "det")
    make_model_part(d / "rec", bundle, "rec")
    cache = next((d / "rec" / "caches").iterdir())
    cache.write_bytes(cache.read_bytes() + b"!")
    before = snapshot(bundle)
    with pytest.raises(Exception, match=str(d / "rec")):
        merge_parts(bundle, [d])
    assert snapshot(bundle) == before
    # The same part given twice (as the PART_DIR and as its folder) is merged once.
    cache.write_bytes(cache.read_bytes()[:-1])
    report = merge_parts(bundle, [d, d / "rec"])
    assert any("given twice" in n for n in report.notes) and len(report.caches_added) == 2


def test_signed_multi_model_bundle_loses_its_signature_on_merge(tmp_path: Path, bundle: Path) -> None:
    """The signature covers manifest.json's bytes, which a merge into any model changes. (Stands in for a real
    signature: merge only looks at whether manifest.sig is there; test_signing.py signs for real.)"""
    (bundle / "manifest.sig").write_bytes(b'{"stand-in": "signature"}')
    report = merge_parts(bundle, [make_model_part(tmp_path / "p", bundle, "rec")])
    assert report.signature_removed and not (bundle / "manifest.sig").exists()
    assert fatal(verify_bundle(bundle)) == []


@pytest.mark.skipif(SERVABLE, reason="this machine has a GPU TensorRT for RTX supports: the warm-up would run")
def test_shim_warmup_loads_one_model_of_the_overlay(tmp_path: Path, bundle: Path) -> None:
    """The real GPU seam up to the backend choice: the overlay of one model of a several-model bundle loads
    through the shim with its model name, and where TRT-RTX cannot run that is a clean error, not a crash."""
    from bundler.farm_gpu import ShimGpu, overlay_bundle

    view = read_bundle_manifest(bundle)[0].view("rec")
    engine = b"weightless engine of rec"
    new = Engine(
        kind="weightless",
        platform="linux_x86_64",
        compute_capabilities=(89,),
        trt_rtx_version=view.trt_rtx.version,
        file=FileRef.for_content("engines", sha256_bytes(engine), len(engine)),
    )
    overlay = overlay_bundle(bundle, view, tmp_path / "overlay", new, engine, new.file.sha256)
    assert read_bundle_manifest(overlay)[0].names == ("rec",) and fatal(verify_bundle(overlay)) == []
    with pytest.raises(BackendUnavailableError) as e:
        ShimGpu().warm(overlay, new.file.sha256, (), 1, tmp_path / "work")
    assert "cannot run this bundle here" in str(e.value)


@pytest.mark.rtx_gpu
@pytest.mark.skipif(
    not SERVABLE,
    reason="needs a GPU TensorRT for RTX supports (SM 7.5/8.x/12.x) as CUDA device 0: "
    "weightless builds, EAGER warm-up and cache serialization run only there",
)
def test_farm_job_on_a_real_rtx_gpu_covers_every_model(tmp_path: Path, bundle: Path) -> None:  # pragma: no cover
    res = CliRunner().invoke(main, ["farm-job", str(bundle), "-o", str(tmp_path / "part"), "--json"])
    assert res.exit_code == 0, res.output
    assert [(m["model"], m["ok"]) for m in json.loads(res.stdout)["models"]] == [("det", True), ("rec", True)]
    merge_parts(bundle, [tmp_path / "part"])
    assert fatal(verify_bundle(bundle)) == []
    for name in ("det", "rec"):
        view = read_bundle_manifest(bundle)[0].view(name)
        assert len(view.engines) == 1 and len(view.runtime_caches) == 1


def test_farm_settings_take_a_models_input(tmp_path: Path) -> None:
    """bundle.toml's [farm].warmup names one model's input as TOML reads { det.x = "8x64" }: a table in the table."""
    import tomllib

    from bundler.config import ConfigError
    from bundler.farm import farm_settings

    table = tomllib.loads('warmup = [{ det.x = "8x64", "input.1" = "1x3" }, { x = "2x64" }]')
    assert farm_settings(table, source="b.toml").warmup == ({"det.x": (8, 64), "input.1": (1, 3)}, {"x": (2, 64)})
    with pytest.raises(ConfigError, match=r"farm.warmup\[0\].*det\.x"):
        farm_settings(tomllib.loads("warmup = [{ det = { x = 8 } }]"), source="b.toml")
