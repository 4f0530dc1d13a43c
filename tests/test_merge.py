"""merge: parts made here (real TRT-RTX engine bytes, opaque cache blobs under real keys) folded into real bundles.

Weightless engines need a GPU, so a part's "weightless" engine here is a real single-SM engine built by the
TRT-RTX builder on the CPU: merge only does bookkeeping with it (hashes, versions, references).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from models import make_mlp, make_mlp_fp16

import bundler.merge_commit as merge_mod
from bundler.build import build_bundle
from bundler.bundle_io import verify_bundle
from bundler.cli import main
from bundler.config import make_options
from bundler.coverage import coverage
from bundler.merge import MergeError, merge_parts
from bundler.part import Part, base_sha256, write_part
from runtime_shim.errors import IntegrityError, ManifestError
from runtime_shim.fsutil import sha256_bytes, sha256_file
from runtime_shim.manifest import CacheKey, Engine, FileRef, RuntimeCache, read_manifest
from runtime_shim.trt.build import BuildRequest, build_engine

REPO = Path(__file__).resolve().parent.parent
RTX4090 = ("NVIDIA GeForce RTX 4090", 0x2684, 89)
RTX5090 = ("NVIDIA GeForce RTX 5090", 0x2B85, 120)


def make_bundle(tmp: Path, factory=make_mlp, name: str = "bundle") -> Path:
    """A real bundle with one weightful engine. The probe reports no GPU, so that on an RTX machine too the
    bundle has no weightless engine and the farm has one to make."""
    model = factory(tmp / f"{name}-model")
    return build_bundle(
        model, tmp / name, options=make_options(shapes=["x=1x64:4x64:16x64"]), probe=lambda: SimpleNamespace(gpus=())
    ).bundle_dir


_ENGINES: dict[tuple[Path, int], bytes] = {}


def real_engine(bundle: Path, sm: int) -> bytes:
    """A real TRT-RTX engine for one SM, built from the bundle's own skeleton and weights (CPU, weightful)."""
    from runtime_shim.fallback import model_on_disk
    from runtime_shim.user_cache import UserCache

    if (bundle, sm) not in _ENGINES:
        manifest, _ = read_manifest(bundle)
        with model_on_disk(manifest, bundle, UserCache("tests", bundle.parent / f"uc-{sm}")) as onnx_path:
            profiles = [p.triples() for p in manifest.profiles]
            _ENGINES[(bundle, sm)] = build_engine(
                BuildRequest(onnx_path=str(onnx_path), profiles=profiles, compute_capabilities=[sm])
            )
    return _ENGINES[(bundle, sm)]


def make_part(
    part_dir: Path,
    bundle: Path,
    *,
    gpu=RTX4090,
    os_name: str = "linux",
    driver: str = "580.95",
    cache: bytes = b"opaque runtime cache 4090",
    created: int = 1_700_000_000,
    engine: bytes | None = None,
    trt_version: str | None = None,
    for_manifest_sha: str | None = None,
) -> Path:
    """A part as farm-job writes it. ``engine``: bytes of a new engine, or None to use the bundle's first engine."""
    manifest, _ = read_manifest(bundle)
    version = trt_version or manifest.trt_rtx.version
    name, pci, sm = gpu
    new_engine = None
    if engine is not None:
        new_engine = Engine(
            kind="weightless",
            platform="windows_amd64" if os_name == "windows" else "linux_x86_64",
            compute_capabilities=(sm,),
            trt_rtx_version=version,
            file=FileRef.for_content("engines", sha256_bytes(engine), len(engine)),
            built_by={"tool": "test"},
        )
    engine_sha = new_engine.file.sha256 if new_engine else manifest.engines[0].file.sha256
    key = CacheKey(
        os=os_name,
        gpu_name=name,
        pci_device_id=pci,
        sm=sm,
        driver_version=driver,
        cuda_flavour=manifest.trt_rtx.cuda_flavour,
        trt_rtx_version=version,
    )
    part = Part(
        bundle_manifest_sha256=for_manifest_sha or sha256_file(bundle / "manifest.json")[0],
        bundle_base_sha256=base_sha256(manifest),
        model=manifest.model.name,
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
    write_part(part_dir, part, {"engines": engine or b"", "caches": cache})
    return part_dir


def snapshot(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def fatal(problems):
    return [p for p in problems if p.fatal]


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path)


# --------------------------------------------------------------------------- clean merges
def test_clean_merge_in_place(tmp_path: Path, bundle: Path) -> None:
    p1 = make_part(tmp_path / "p1", bundle, engine=real_engine(bundle, 89))
    p2 = make_part(tmp_path / "p2", bundle, gpu=RTX5090, os_name="windows", cache=b"opaque 5090 windows")
    before = read_manifest(bundle)[0]
    report = merge_parts(bundle, [p1, p2])
    after = read_manifest(bundle)[0]
    assert fatal(verify_bundle(bundle)) == []
    assert len(after.engines) == len(before.engines) + 1 and after.engines[-1].compute_capabilities == (89,)
    assert [c.key.gpu_name for c in after.runtime_caches] == [RTX4090[0], RTX5090[0]]
    assert after.runtime_caches[0].engines == (after.engines[-1].file.sha256,)
    assert len(report.engines_added) == 1 and len(report.caches_added) == 2 and report.conflicts == ()
    assert (bundle / after.runtime_caches[1].file.path).read_bytes() == b"opaque 5090 windows"
    assert not [p for p in bundle.parent.iterdir() if ".merge-" in p.name], "no staging dir left behind"
    # Merging the same parts again changes nothing.
    manifest_bytes = (bundle / "manifest.json").read_bytes()
    again = merge_parts(bundle, [p1, p2])
    assert (bundle / "manifest.json").read_bytes() == manifest_bytes and again.caches_added == ()


def test_merge_to_new_directory_leaves_the_bundle_alone(tmp_path: Path, bundle: Path) -> None:
    part = make_part(tmp_path / "p1", bundle, engine=real_engine(bundle, 89))
    before = snapshot(bundle)
    merge_parts(bundle, [part], out=tmp_path / "merged")
    assert snapshot(bundle) == before
    assert fatal(verify_bundle(tmp_path / "merged")) == []
    assert len(read_manifest(tmp_path / "merged")[0].runtime_caches) == 1
    with pytest.raises(MergeError, match="not an empty directory"):
        merge_parts(bundle, [part], out=tmp_path / "merged")


def test_parts_merged_one_at_a_time(tmp_path: Path, bundle: Path) -> None:
    """A part made before another part was merged still fits: same model, weights and profiles."""
    p1 = make_part(tmp_path / "p1", bundle, engine=real_engine(bundle, 89))
    p2 = make_part(tmp_path / "p2", bundle, gpu=RTX5090, cache=b"5090")
    merge_parts(bundle, [p1])
    report = merge_parts(bundle, [p2])
    assert any("earlier state" in n for n in report.notes)
    assert len(read_manifest(bundle)[0].runtime_caches) == 2 and fatal(verify_bundle(bundle)) == []


def test_merge_cli_json_and_coverage(tmp_path: Path, bundle: Path) -> None:
    p1 = make_part(tmp_path / "p1", bundle, engine=real_engine(bundle, 89))
    res = CliRunner().invoke(main, ["merge", str(bundle), str(p1), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert len(report["caches_added"]) == 1 and report["caches_added"][0]["key"]["pci_device_id"] == 0x2684
    cov = {(r.platform, r.sm): r for r in coverage(read_manifest(bundle)[0]).rows}
    assert (
        cov[("linux_x86_64", 89)].engine == "weightless"
        and cov[("linux_x86_64", 89)].caches[0].key.gpu_name == RTX4090[0]
    )
    assert cov[("linux_x86_64", 86)].engine == "weightful" and cov[("linux_x86_64", 86)].caches == ()
    assert cov[("linux_x86_64", 75)].engine == "build"  # TRT-RTX's default targets leave Turing out
    res = CliRunner().invoke(main, ["inspect", str(bundle), "--json"])
    rows = {(r["platform"], r["sm"]): r for r in json.loads(res.stdout)["coverage"]["rows"]}
    assert rows[("linux_x86_64", 89)]["caches"][0]["pci_device_id"] == 0x2684
    res = CliRunner().invoke(main, ["inspect", str(bundle)])
    assert res.exit_code == 0 and "linux_x86_64   8.9   weightless  NVIDIA GeForce RTX 4090 0x2684 580.95" in res.stdout


# --------------------------------------------------------------------------- refused parts
def test_part_for_another_bundle_is_refused(tmp_path: Path, bundle: Path) -> None:
    other = make_bundle(tmp_path, make_mlp_fp16, name="other")
    part = make_part(tmp_path / "p", other)
    before = snapshot(bundle)
    with pytest.raises(MergeError, match="made for another bundle") as e:
        merge_parts(bundle, [part])
    assert str(part) in str(e.value) and "mlp_fp16" in str(e.value)
    res = CliRunner().invoke(main, ["merge", str(bundle), str(part)])
    assert res.exit_code == 1 and "made for another bundle" in res.stderr and "hint:" in res.stderr
    assert snapshot(bundle) == before


@pytest.mark.parametrize("where", ["cache", "engine"])
def test_part_from_another_trt_rtx_version_is_refused(tmp_path: Path, bundle: Path, where: str) -> None:
    if where == "cache":
        part = make_part(tmp_path / "p", bundle, trt_version="1.6.0.1")
    else:  # a hand-edited part: engine version differs from its cache key
        part = make_part(tmp_path / "p", bundle, engine=b"engine bytes")
        data = json.loads((part / "part.json").read_text())
        data["engine"]["trt_rtx_version"] = "1.6.0.1"
        (part / "part.json").write_text(json.dumps(data))
    before = snapshot(bundle)
    with pytest.raises(MergeError, match=r"1\.6\.0\.1.*TensorRT for RTX 1\.7"):
        merge_parts(bundle, [part])
    assert snapshot(bundle) == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "part.json"])
def test_tampered_part_is_refused(tmp_path: Path, bundle: Path, damage: str) -> None:
    part = make_part(tmp_path / "p", bundle, engine=real_engine(bundle, 89))
    cache_file = next((part / "caches").iterdir())
    if damage == "flip":
        data = bytearray(cache_file.read_bytes())
        data[3] ^= 0xFF
        cache_file.write_bytes(bytes(data))
    elif damage == "truncate":
        engine_file = next((part / "engines").iterdir())
        engine_file.write_bytes(engine_file.read_bytes()[:-10])
    elif damage == "delete":
        cache_file.unlink()
    else:
        (part / "part.json").write_text((part / "part.json").read_text()[:-20])
    before = snapshot(bundle)
    expected = ManifestError if damage == "part.json" else IntegrityError
    with pytest.raises(expected) as e:
        merge_parts(bundle, [part])
    assert str(part) in str(e.value)
    assert snapshot(bundle) == before


def test_cache_made_with_an_unknown_engine_is_refused(tmp_path: Path, bundle: Path) -> None:
    part = make_part(tmp_path / "p", bundle)
    data = json.loads((part / "part.json").read_text())
    data["runtime_cache"]["engines"] = ["ab" * 32]
    (part / "part.json").write_text(json.dumps(data))
    with pytest.raises(MergeError, match="neither in the bundle nor in any part"):
        merge_parts(bundle, [part])


# --------------------------------------------------------------------------- conflicts
def test_two_caches_for_one_key_keep_the_newest(tmp_path: Path, bundle: Path) -> None:
    new = make_part(tmp_path / "new", bundle, cache=b"newer cache", created=2_000)
    old = make_part(tmp_path / "old", bundle, cache=b"older cache", created=1_000)
    report = merge_parts(bundle, [new, old])  # command-line order must not matter
    (conflict,) = report.conflicts
    assert conflict.kept == str(new) and conflict.reason == "newest"
    assert conflict.dropped == ((str(old), sha256_bytes(b"older cache"), 1_000),)
    (cache,) = read_manifest(bundle)[0].runtime_caches
    assert (bundle / cache.file.path).read_bytes() == b"newer cache"


@pytest.mark.parametrize("prefer, kept", [("oldest", "old"), ("old", "old"), ("new", "new")])
def test_prefer_chooses_the_cache(tmp_path: Path, bundle: Path, prefer: str, kept: str) -> None:
    parts = {
        n: make_part(tmp_path / n, bundle, cache=f"{n} cache".encode(), created=c)
        for n, c in (("new", 2_000), ("old", 1_000))
    }
    arg = prefer if prefer == "oldest" else str(parts[prefer])
    res = CliRunner().invoke(main, ["merge", str(bundle), str(parts["new"]), str(parts["old"]), "--prefer", arg])
    assert res.exit_code == 0, res.output
    assert "conflict" in res.stdout and f"kept {parts[kept]}" in res.stdout  # merge's report is its result
    (cache,) = read_manifest(bundle)[0].runtime_caches
    assert (bundle / cache.file.path).read_bytes() == f"{kept} cache".encode()


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "move-in"])
def test_conflict_with_a_cache_already_in_the_bundle(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(merge_mod, "_exchange", lambda a, b: False)
    merge_parts(bundle, [make_part(tmp_path / "first", bundle, cache=b"first", created=1_000)])
    second = make_part(tmp_path / "second", bundle, cache=b"second", created=2_000)
    # --prefer BUNDLE keeps what is there: nothing changes, the conflict is still reported.
    before = snapshot(bundle)
    report = merge_parts(bundle, [second], prefer=str(bundle))
    assert report.conflicts[0].kept == "bundle" and snapshot(bundle) == before
    report = merge_parts(bundle, [second])
    assert report.conflicts[0].kept == str(second)
    (cache,) = read_manifest(bundle)[0].runtime_caches
    assert (bundle / cache.file.path).read_bytes() == b"second"
    assert fatal(verify_bundle(bundle)) == [], "the replaced cache file must be gone"


def test_prefer_names_nothing_given(tmp_path: Path, bundle: Path) -> None:
    part = make_part(tmp_path / "p", bundle)
    with pytest.raises(MergeError, match="--prefer"):
        merge_parts(bundle, [part], prefer=str(tmp_path / "nope"))


# --------------------------------------------------------------------------- crashes
@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "move-in"])
def test_failed_manifest_write_leaves_the_bundle_unchanged(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    part = make_part(tmp_path / "p", bundle, engine=real_engine(bundle, 89))
    before = snapshot(bundle)
    real_write = merge_mod.atomic_write
    calls = []

    def failing_write(path, data):
        calls.append(path)
        if exchange or len(calls) > 1:  # move-in: the stage's manifest, then the bundle's, which fails
            raise OSError(28, "No space left on device")
        real_write(path, data)

    if not exchange:
        monkeypatch.setattr(merge_mod, "_exchange", lambda a, b: False)
    monkeypatch.setattr(merge_mod, "atomic_write", failing_write)
    with pytest.raises(MergeError, match="cannot write the merged bundle: No space left on device") as e:
        merge_parts(bundle, [part])
    assert "left as it was" in str(e.value) and "disk is full" in (e.value.hint or "")
    assert snapshot(bundle) == before
    assert fatal(verify_bundle(bundle)) == []
    assert not [p for p in bundle.parent.iterdir() if ".merge-" in p.name]


_KILL_SCRIPT = """
import sys, time
from pathlib import Path
import bundler.merge_commit as m
from bundler.merge import merge_parts
marker = Path(sys.argv[3])
def stall(*args, **kwargs):
    marker.write_text("at the commit point")
    time.sleep(60)
m.{patched} = stall
merge_parts(sys.argv[1], [sys.argv[2]])
"""


@pytest.mark.skipif(os.name != "posix", reason="uses SIGKILL")
@pytest.mark.parametrize("patched", ["_exchange", "_copy_verified"], ids=["before-commit", "while-copying"])
def test_killed_merge_leaves_the_bundle_unchanged(tmp_path: Path, bundle: Path, patched: str) -> None:
    """A real merge process, killed with SIGKILL in the middle: the bundle must be as it was and still verify."""
    part = make_part(tmp_path / "p", bundle, engine=real_engine(bundle, 89))
    before = snapshot(bundle)
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT.format(patched=patched), str(bundle), str(part), str(marker)],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, f"merge exited early: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "merge never reached the point to kill it at"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(bundle) == before
    assert fatal(verify_bundle(bundle)) == []
    # The next merge succeeds despite the leftover staging dir beside the bundle.
    merge_parts(bundle, [part])
    assert fatal(verify_bundle(bundle)) == []


@pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="renameat2(RENAME_EXCHANGE) is Linux-only; elsewhere merge moves files in",
)
def test_atomic_exchange_swaps_directories(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a"), (b / "f").write_text("b")
    assert merge_mod._exchange(a, b) is True
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"


def test_merge_through_a_link_updates_the_real_bundle(tmp_path: Path, bundle: Path) -> None:
    link = tmp_path / "current"
    link.symlink_to(bundle, target_is_directory=True)
    merge_parts(link, [make_part(tmp_path / "p", bundle)])
    assert link.is_symlink() and len(read_manifest(bundle)[0].runtime_caches) == 1
    assert fatal(verify_bundle(bundle)) == []
    with pytest.raises(MergeError, match="inside the bundle"):
        merge_parts(bundle, [tmp_path / "p"], out=bundle / "merged")


def test_weights_only_bundle_is_filled_by_the_farm(tmp_path: Path) -> None:
    """build --no-weightful: weights + skeleton only; the farm's engines fill it, other SMs build on the user's GPU."""
    model = make_mlp(tmp_path / "model")
    bundle = build_bundle(
        model,
        tmp_path / "b",
        options=make_options(shapes=["x=1x64:4x64:16x64"], weightful=False),
        probe=lambda: SimpleNamespace(gpus=()),
    ).bundle_dir
    assert read_manifest(bundle)[0].engines == ()
    assert {r.engine for r in coverage(read_manifest(bundle)[0]).rows} == {"build"}
    merge_parts(bundle, [make_part(tmp_path / "p", bundle, engine=real_engine(bundle, 89))])
    assert fatal(verify_bundle(bundle)) == []
    rows = {r.sm: r.engine for r in coverage(read_manifest(bundle)[0]).rows}
    assert rows[89] == "weightless" and rows[86] == "build"


# --------------------------------------------------------------------------- concurrent merges, stale staging dirs
_PAUSE_SCRIPT = """
import sys, time
from pathlib import Path
import bundler.merge_commit as m
from bundler.merge import merge_parts
bundle, part, marker, go = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
real = getattr(m, sys.argv[5])
def pause(*args, **kwargs):
    marker.write_text("paused")
    while not go.exists():
        time.sleep(0.02)
    return real(*args, **kwargs)
setattr(m, sys.argv[5], pause)
merge_parts(bundle, [part], progress=print)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _start_paused_merge(tmp_path: Path, bundle: Path, part: Path, at: str) -> tuple[subprocess.Popen, Path]:
    """A real merge process that stops at ``merge_commit.<at>`` until the returned 'go' file exists."""
    marker, go = tmp_path / f"paused-{part.name}", tmp_path / f"go-{part.name}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSE_SCRIPT, str(bundle), str(part), str(marker), str(go), at],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, f"merge exited early: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "merge never reached the pause point"
        time.sleep(0.02)
    return proc, go


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from bundler.cli import main; main()", *args], env=_env(), **kwargs)


@pytest.mark.skipif(os.name != "posix", reason="pauses a real process at a patched point")
def test_concurrent_in_place_merges_keep_both_parts(tmp_path: Path, bundle: Path) -> None:
    """Two real merge processes into one bundle: the second waits for the first (and says so), then reads the
    bundle the first wrote, so both parts end up in it. Without the lock, the second one's commit replaced
    the first one's and one part was lost while both exited 0."""
    p1 = make_part(tmp_path / "p4090", bundle, gpu=RTX4090, cache=b"cache 4090")
    p2 = make_part(tmp_path / "p5090", bundle, gpu=RTX5090, cache=b"cache 5090")
    first, go = _start_paused_merge(tmp_path, bundle, p1, "_exchange")  # holds the lock, stage complete
    log = tmp_path / "second.log"
    with open(log, "wb") as err:
        second = _cli("merge", str(bundle), str(p2), stderr=err)
        deadline = time.monotonic() + 120
        while "waiting for another merge" not in log.read_text():
            assert second.poll() is None, f"the second merge did not wait: {log.read_text()}"
            assert time.monotonic() < deadline, "the second merge never said what it waits for"
            time.sleep(0.05)
        go.touch()
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
        assert second.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert str(bundle / "").rstrip("/") in text and ".merge.lock" in text
    caches = read_manifest(bundle)[0].runtime_caches
    assert sorted(c.key.gpu_name for c in caches) == sorted([RTX4090[0], RTX5090[0]])
    assert fatal(verify_bundle(bundle)) == []
    assert not [p for p in bundle.parent.iterdir() if ".merge-" in p.name]


def test_lock_timeout_is_a_clean_error(tmp_path: Path, bundle: Path) -> None:
    import filelock

    from bundler.merge_commit import lock_path

    held = filelock.FileLock(str(lock_path(bundle.resolve())), thread_local=False)
    said: list[str] = []
    with held:
        with pytest.raises(MergeError, match=r"still locked after .* another merge into") as e:
            merge_parts(bundle, [make_part(tmp_path / "p", bundle)], lock_timeout=0.2, progress=said.append)
    assert "delete that lock file" in (e.value.hint or "")
    assert read_manifest(bundle)[0].runtime_caches == ()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "fifo"])
def test_a_damaged_bundle_is_not_carried_forward(tmp_path: Path, bundle: Path, damage: str) -> None:
    """merge checks the bundle's own pinned files (type, size, sha256) before linking them into the result."""
    part = make_part(tmp_path / "p", bundle)
    (store,) = (bundle / "weights").iterdir()
    if damage == "flip":
        data = bytearray(store.read_bytes())
        data[len(data) // 2] ^= 0x01
        store.write_bytes(bytes(data))
    elif damage == "truncate":
        store.write_bytes(store.read_bytes()[:-1])
    elif damage == "delete":
        store.unlink()
    else:
        store.unlink()
        os.mkfifo(store)
    before = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")}
    out = tmp_path / "out"
    for kwargs in ({}, {"out": out}):
        with pytest.raises(IntegrityError, match="cannot merge into a damaged bundle") as e:
            merge_parts(bundle, [part], **kwargs)
        assert f"weights/{store.name}" in str(e.value)
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")} == before
    assert read_manifest(bundle)[0].runtime_caches == () and not out.exists()


@pytest.mark.skipif(os.name != "posix", reason="uses SIGKILL and flock")
def test_staging_dir_of_a_killed_merge_is_swept_and_a_live_one_is_not(tmp_path: Path, bundle: Path) -> None:
    """kill -9 leaves the staging dir; the next merge removes it. A live merge's staging dir is flock-ed, so a
    sweep leaves it alone even when it looks old. Sweeps also skip dirs younger than 30 s (the instant between
    mkdir and flock): the test ages the leftovers with os.utime instead of waiting."""
    from runtime_shim.fsutil import sweep_stale_temp_dirs

    def stages() -> list[Path]:
        return sorted(p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.merge-"))

    def age(path: Path) -> None:
        os.utime(path, (time.time() - 3600, time.time() - 3600))

    part = make_part(tmp_path / "p", bundle, engine=real_engine(bundle, 89))
    live, go = _start_paused_merge(tmp_path, bundle, part, "_copy_verified")
    (stage,) = stages()
    age(stage)
    assert sweep_stale_temp_dirs(bundle.parent, ".bundle.merge-", min_age_s=0) == []
    assert stage.is_dir()
    live.send_signal(signal.SIGKILL)
    live.wait()
    assert stages() == [stage]  # kill -9: nothing ran to remove it
    age(stage)
    said: list[str] = []
    merge_parts(bundle, [part], progress=said.append)
    assert stages() == [] and any(f"removed {stage}" in m for m in said)
    assert fatal(verify_bundle(bundle)) == [] and len(read_manifest(bundle)[0].engines) == 2
    assert go.parent.is_dir()
