"""Hostile and faulty inputs on the runtime side (issue 11), on real bundles, files and processes: manifest-only edits
of the weight index, files that are not regular files or are huge, a write through a shared mapping, a full disk at a
cache save, a held lock. Each must end in a clean one-line error naming the file (and the key path), never a hang, a
traceback, a MemoryError or unchecked bytes reaching TRT-RTX."""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import runtime_shim
from runtime_shim.errors import BundleError, IntegrityError, ManifestError
from runtime_shim.fsutil import atomic_write
from runtime_shim.manifest import read_manifest
from runtime_shim.refit import refit_engine
from runtime_shim.user_cache import UserCache

sys.path.insert(0, str(Path(__file__).parent))
import models
from test_trt_session import RecordingFakeTrtRuntime, _bundle_with_stand_ins, _load
from test_user_cache import _child, _tmpfs, _wait_for

from bundler.build import build_bundle
from bundler.cli import main
from bundler.config import BuildOptions


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The MLP test model bundled once (no engines: this machine runs it on ONNX Runtime), and sample inputs."""
    tmp = tmp_path_factory.mktemp("built")
    name, factory, prof = next(m for m in models.ALL_BUNDLABLE if m[0] == "mlp")
    onnx_path = factory(tmp)
    build_bundle(
        onnx_path,
        tmp / "bundle",
        options=BuildOptions(profiles=models.as_profiles(prof), weightful=False, weightless=False),
    )
    feeds = models.sample_inputs(name, prof, onnx_path)
    for k, v in feeds.items():
        np.save(tmp / f"{k}.npy", v)
    return tmp / "bundle", feeds


@pytest.fixture
def bundle(built, tmp_path) -> Path:
    """A fresh copy of the built bundle for each test to damage."""
    return Path(shutil.copytree(built[0], tmp_path / "bundle"))


def _edit(bundle: Path, fn: Callable[[dict], None]) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    fn(data)
    atomic_write(bundle / "manifest.json", json.dumps(data).encode())


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 keeps stderr apart by default
        return CliRunner()


def _cli(built, bundle: Path, tmp_path: Path, command: str) -> Any:
    args = [command, str(bundle)]
    if command == "run":
        args += ["--cache-dir", str(tmp_path / "cli-cache")]
        args += [a for k in built[1] for a in ("--input", f"{k}={built[0].parent / (k + '.npy')}")]
    return _runner().invoke(main, args)


def _one_line_error(text: str, *words: str) -> None:
    """``text`` (an error as the user sees it) names every word on one of its lines, with no traceback."""
    assert "Traceback" not in text and "MemoryError" not in text, text
    assert any(all(w in line for w in words) for line in text.splitlines()), (words, text)


# --------------------------------------------------------------------------- hole 1: the weight index
def _largest_tensor_to_smallest_blob(d: dict) -> None:
    w, tensors = d["weights"], models.model0(d)["tensors"]
    big = max(range(len(tensors)), key=lambda i: w["blobs"][tensors[i]["blob"]]["nbytes"])
    tensors[big]["blob"] = min(range(len(w["blobs"])), key=lambda b: w["blobs"][b]["nbytes"])


def _blob_of_a_tebibyte(d: dict) -> None:
    blob = d["weights"]["blobs"][0]
    blob["frames"][-1]["raw_size"] += (1 << 40) - blob["nbytes"]
    blob["nbytes"] = 1 << 40


def _empty_index(d: dict) -> None:
    d["weights"].update(blobs=[], raw_size=0)
    models.model0(d)["tensors"] = []


def _overlapping_frames(d: dict) -> None:
    frames = [f for b in d["weights"]["blobs"] for f in b["frames"]]
    frames[1]["offset"] = frames[0]["offset"]


INDEX_EDITS = [
    (_largest_tensor_to_smallest_blob, r"models[0].tensors[", "bytes, but its blob"),
    (lambda d: d["weights"].update(raw_size=2 << 30), "weights.raw_size", "2147483648, expected"),
    (_blob_of_a_tebibyte, "weights.blobs[0].frames[", "more than zstd can decode to"),
    (_empty_index, "weights.file.size", "the index lists no weights"),
    (_overlapping_frames, "weights.blobs[", "overlaps the frame before it"),
]
INDEX_IDS = ["large-tensor-small-blob", "raw-size-2GiB", "blob-1TiB", "empty-index", "overlapping-frames"]


@pytest.mark.parametrize("edit, key, words", INDEX_EDITS, ids=INDEX_IDS)
def test_a_manifest_only_edit_of_the_weight_index_is_refused_by_load_verify_and_run(
    built, bundle, tmp_path, edit, key, words
) -> None:
    _edit(bundle, edit)  # no hash changed: every file still matches its pin
    with pytest.raises(ManifestError) as e:
        runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c")
    _one_line_error(str(e.value), "manifest.json", key, words)
    assert "\n" not in str(e.value) and "weight index" in e.value.hint
    r = _cli(built, bundle, tmp_path, "verify")
    assert r.exit_code == 1
    _one_line_error(r.stdout + r.stderr, "manifest.json", key, words)
    r = _cli(built, bundle, tmp_path, "run")
    assert r.exit_code == 1 and r.stderr.startswith("ERROR ")
    _one_line_error(r.stderr, "manifest.json", key, words)
    assert not (tmp_path / "c").exists() or not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


class _ShortSource:
    """A weight source whose bytes fall short of what it declares (what an index gap or decoder fault would give)."""

    def spec(self, name: str) -> tuple[str, int]:
        return "float32", 16

    def read(self, name: str) -> np.ndarray:
        return np.zeros(8, np.float32)

    def upload(self, names, open_uploader):
        class Upload:
            tensors = {n: type("T", (), {"ptr": 0x1000, "nbytes": 32})() for n in names}

            def free(self) -> None:
                pass

        return Upload()


class _SizeOnlyRuntime:
    """A FAKE of the TrtRuntime seam that asks for one float32 x 16 weight and records what it is given."""

    def __init__(self) -> None:
        self.given: list[tuple] = []

    def refittable_weights(self, engine):
        return ["w"]

    def weight_prototype(self, engine, name):
        return "float32", 16

    def set_weights(self, engine, name, dtype, count, array):
        self.given.append(("host", name))
        return True

    def set_device_weights(self, engine, name, dtype, count, ptr):
        self.given.append(("device", name))
        return True

    def open_uploader(self, **kw):
        raise AssertionError("the source opens it")

    def refit(self, engine):
        return True


@pytest.mark.parametrize("on_device", [True, False])
def test_refit_never_hands_trt_rtx_a_buffer_shorter_than_dtype_times_count(on_device) -> None:
    runtime = _SizeOnlyRuntime()
    with pytest.raises(
        IntegrityError, match=r"weight 'w': float32 x 16 needs 64 bytes, the buffer to refit from has 32"
    ):
        refit_engine(runtime, "engine", _ShortSource(), on_device=on_device, source="engines[0].file")
    assert runtime.given == []


# --------------------------------------------------------------------------- hole 5: every load hashes what it reads
def test_a_write_through_a_shared_mapping_after_a_load_is_caught_by_the_next_load(tmp_path) -> None:
    bundle, m, _ = _bundle_with_stand_ins(tmp_path, "mlp")
    path = bundle / m.weights.file.path
    frame = m.weights.blobs[-1].frames[-1]
    at = frame.offset + frame.size // 2
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as shared:
        shared[at] = shared[at]  # the page is now writable and dirty in this mapping: later writes fault no more
        with _load(bundle, RecordingFakeTrtRuntime(m), tmp_path) as s:
            assert s.report.engine["weights_check"] == "every frame's blake3 checked as it was read"
        before = os.stat(path)
        shared[at] ^= 0x10  # another process's write through its mapping: no write() call, no size change
        after = os.stat(path)
        fake = RecordingFakeTrtRuntime(m)
        with pytest.raises(IntegrityError) as e:
            _load(bundle, fake, tmp_path)
        shared[at] ^= 0x10
    # A file identity (size, mtime, ctime, inode) cannot tell: the kernel did not move the times here.
    assert (before.st_size, before.st_ino) == (after.st_size, after.st_ino)
    _one_line_error(str(e.value), str(path), f"frame {len(m.weights.blobs[-1].frames) - 1}", "blake3")
    assert "set_weights" not in fake.names_called()  # refused before anything reached TRT-RTX


# --------------------------------------------------------------------------- hole 6: what is not a regular file
def _no_hang(fn: Callable[[], Any], fifo: Path | None) -> Any:
    """Run ``fn`` on a thread; if it is still blocked after 60 s (a read of a FIFO), unblock it and fail."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        if fifo is not None:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader sees EOF
        t.join(10)
        pytest.fail(f"blocked on {fifo}")
    if "error" in out:
        raise out["error"]
    return out["value"]


def _replace(path: Path, kind: str) -> None:
    if kind in ("fifo", "dev-zero") and not hasattr(os, "mkfifo"):
        pytest.skip(f"no {kind} on this system")
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "sparse-40GiB":
        with open(path, "wb") as f:
            f.truncate(40 << 30)


FILES = ["manifest", "skeleton", "weights"]
KINDS = ["fifo", "dir", "dev-zero", "sparse-40GiB"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", FILES)
def test_a_bundle_file_that_is_not_a_regular_file_or_is_huge_is_refused_by_every_command(
    built, bundle, tmp_path, which, kind
) -> None:
    m, _ = read_manifest(bundle)
    rel = {"manifest": "manifest.json", "skeleton": m.skeleton.file.path, "weights": m.weights.file.path}[which]
    path = bundle / rel
    _replace(path, kind)
    fifo = path if kind == "fifo" else None
    with pytest.raises(BundleError) as e:
        _no_hang(lambda: runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c"), fifo)
    assert not isinstance(e.value, MemoryError)
    _one_line_error(str(e.value), rel)
    for command in ("verify", "inspect", "run"):
        r = _no_hang(lambda c=command: _cli(built, bundle, tmp_path, c), fifo)
        if command == "inspect" and which != "manifest":
            assert r.exit_code == 0, r.output  # inspect reads the manifest only
            continue
        assert r.exit_code == 1, (command, r.output)
        _one_line_error(r.stdout + r.stderr, rel)


def test_a_driver_version_of_5000_digits_is_a_clean_manifest_error(built, bundle, tmp_path) -> None:
    def add_cache(d: dict) -> None:
        models.model0(d)["runtime_caches"] = [
            {
                "key": {
                    "os": "linux",
                    "gpu_name": "NVIDIA GeForce RTX 4090",
                    "pci_device_id": 0x2684,
                    "sm": 89,
                    "driver_version": "5" * 5000,
                    "cuda_flavour": "cu13",
                    "trt_rtx_version": d["trt_rtx"]["version"],
                },
                "engines": [],
                "file": d["weights"]["file"],
            }
        ]

    _edit(bundle, add_cache)
    with pytest.raises(ManifestError) as e:
        runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c")
    _one_line_error(str(e.value), "manifest.json", "runtime_caches[0].key.driver_version", "(5000 characters)")
    assert len(str(e.value)) < 400
    _edit(
        bundle,
        lambda d: models.model0(d)["runtime_caches"][0]["key"].update(driver_version="580.95", gpu_name="G" * 100_000),
    )
    r = _cli(built, bundle, tmp_path, "verify")
    assert r.exit_code == 1
    _one_line_error(r.stdout + r.stderr, "runtime_caches[0].key.gpu_name", "at most 256 characters")


# --------------------------------------------------------------------------- hole 7: a full disk at a cache save
def test_a_full_disk_when_the_session_saves_its_cache_is_a_warning(tmp_path, caplog) -> None:
    bundle, m, feeds = _bundle_with_stand_ins(tmp_path, "mlp")
    with _tmpfs(tmp_path / "full", "64k") as cache_dir:
        session = _load_fake(bundle, m, cache_dir)
        assert UserCache("T", cache_dir).writable  # the cache dir is set up: the save itself meets the full disk
        with contextlib.suppress(OSError), open(cache_dir / "filler", "wb") as f:
            f.write(os.urandom(1 << 20))  # fills the file system
        with caplog.at_level(logging.WARNING, "runtime_shim"):
            session.run(feeds)
            session.close()  # saves the runtime cache: logged, never raised
        assert "runtime cache not saved" in caplog.text and "No space left on device" in caplog.text


def _load_fake(bundle: Path, m: Any, cache_dir: Path) -> Any:
    from test_trt_session import MACHINE

    return runtime_shim.Loader(probe=lambda: MACHINE, trt_runtime=lambda device: RecordingFakeTrtRuntime(m)).load(
        bundle, "T", cache_dir=cache_dir
    )


# --------------------------------------------------------------------------- holes 8 and 9: killed writers, held locks
def test_load_sweeps_what_a_writer_killed_mid_save_left(bundle, tmp_path) -> None:
    cache = tmp_path / "c"
    assert UserCache("T", cache).writable  # made first: the child's one write is then its runtime cache
    proc = _child("die-mid-save", str(cache))
    try:
        _wait_for(proc, "HALF")
        runtime_shim.load(bundle, "T", cache_dir=cache).close()  # the writer is alive: its temp file stays
        temps = list(cache.rglob("*.tmp"))
        assert len(temps) == 1 and ".rtcache." in temps[0].name
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert temps[0].exists()
    runtime_shim.load(bundle, "T", cache_dir=cache).close()
    assert not temps[0].exists()


def test_a_save_waiting_for_a_lock_held_by_another_process_says_so_at_warning_level(tmp_path, caplog) -> None:
    from test_trt_session import MACHINE, RTX4090

    from runtime_shim.cache_key import cache_key_for, key_id, model_id

    bundle, m, feeds = _bundle_with_stand_ins(tmp_path, "mlp")
    cache = tmp_path / "c"
    session = _load_fake(bundle, m, cache)
    holder = _child("hold-for", str(cache), f"rtcache-{model_id(m)}-{key_id(cache_key_for(MACHINE, RTX4090))}", "3")
    try:
        _wait_for(holder, "HOLDING")
        with caplog.at_level(logging.INFO, "runtime_shim"):
            session.close()  # waits for the other process, then saves
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, caplog.text
        held_by = f"held by process {holder.pid}" if sys.platform.startswith("linux") else "held by another process"
        assert ".lock, " + held_by in warnings[0]
        assert "saving the runtime cache" in warnings[0] and "waiting up to" in warnings[0]
        assert "saved the runtime cache" in caplog.text
    finally:
        holder.kill()
        holder.wait()


def test_an_index_emptied_with_its_weight_file_re_pinned_is_caught_by_the_skeleton(built, bundle, tmp_path) -> None:
    """The index and its weight file agree (both empty, hashes re-pinned) but the model has weights: only the skeleton
    can tell. verify checks every external reference against the index with load()'s own code; load() refuses too."""
    import hashlib

    from runtime_shim.store.format import MAGIC

    m, _ = read_manifest(bundle)
    (bundle / m.weights.file.path).unlink()
    sha = hashlib.sha256(MAGIC).hexdigest()
    atomic_write(bundle / "weights" / f"{sha}.trtxw", MAGIC)

    def empty(d: dict) -> None:
        _empty_index(d)
        d["weights"]["file"] = {"path": f"weights/{sha}.trtxw", "sha256": sha, "size": len(MAGIC)}

    _edit(bundle, empty)
    r = _cli(built, bundle, tmp_path, "verify")
    assert r.exit_code == 1
    _one_line_error(r.stdout, "skeleton/", "points at", "no blob of the manifest's weight store")
    with pytest.raises(BundleError):
        runtime_shim.load(bundle, "T", cache_dir=tmp_path / "c")
