"""The user cache dir with real processes: concurrent saves, a save killed midway, a held lock, read-only and full disks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runtime_shim.errors import CacheError
from runtime_shim.manifest import CacheKey
from runtime_shim.user_cache import ENV_VAR, LAYOUT, UserCache, default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
KEY = CacheKey(
    os="linux",
    gpu_name="NVIDIA GeForce RTX 4090",
    pci_device_id=0x2684,
    sm=89,
    driver_version="580.95.05",
    cuda_flavour="cu13",
    trt_rtx_version="1.7.1.116",
)
MODEL = "m-0123456789abcdef"

# A child process: same cache, same key; behaviour picked by argv.
CHILD = textwrap.dedent("""
    import hashlib, os, sys, time
    from runtime_shim.manifest import CacheKey
    from runtime_shim import user_cache
    key = CacheKey(os="linux", gpu_name="NVIDIA GeForce RTX 4090", pci_device_id=0x2684, sm=89, driver_version="580.95.05",
                   cuda_flavour="cu13", trt_rtx_version="1.7.1.116")
    mode, cache_dir = sys.argv[1], sys.argv[2]
    cache = user_cache.UserCache("T", cache_dir, lock_timeout=60)

    def payload(i):
        body = os.urandom(200_000 + 1000 * i)
        return hashlib.sha256(body).hexdigest().encode() + body  # self-checking: first 64 bytes hash the rest

    if mode == "hammer":
        bad = 0
        for i in range(int(sys.argv[3])):
            assert cache.save_runtime_cache("MODEL", key, payload(i))
            got = cache.read_runtime_cache("MODEL", key)
            if got is None or hashlib.sha256(got[64:]).hexdigest().encode() != got[:64]:
                bad += 1
        print("BAD", bad, flush=True)
    elif mode == "hold":
        with cache.lock(sys.argv[3]):
            print("HOLDING", flush=True)
            time.sleep(60)
    elif mode == "hold-for":
        with cache.lock(sys.argv[3]):
            print("HOLDING", flush=True)
            time.sleep(float(sys.argv[4]))
    elif mode == "die-mid-save":
        from runtime_shim.fsutil import atomic_writer

        def slow_write(path, data):
            with atomic_writer(path) as f:
                f.write(data[: len(data) // 2])
                f.flush()
                print("HALF", flush=True)
                time.sleep(60)
                f.write(data[len(data) // 2:])
        user_cache.atomic_write = slow_write
        cache.save_runtime_cache("MODEL", key, payload(7))
""").replace("MODEL", MODEL)


def _child(*args: str) -> subprocess.Popen:
    # Keep the caller's PYTHONPATH: where the dependencies come from a --target dir, the child needs it too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline()
    assert word in line, f"child said {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"


def test_layout_tag_and_env_override(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert default_cache_dir("MyApp") == tmp_path / "env"
    monkeypatch.delenv(ENV_VAR)
    assert default_cache_dir("MyApp").name == "MyApp"
    cache = UserCache("MyApp", tmp_path / "c")
    assert cache.writable
    assert (tmp_path / "c" / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f597d28d172789f06886806bc55")
    made = {p.name for p in (tmp_path / "c" / LAYOUT).iterdir()}
    assert made >= {"corrupt", "engines", "locks", "runtime-caches"} and "verified" not in made  # stamps: retired


def test_round_trip_and_a_corrupt_file_is_set_aside(tmp_path, caplog) -> None:
    cache = UserCache("T", tmp_path)
    assert cache.read_runtime_cache(MODEL, KEY) is None and not cache.has_runtime_cache(MODEL, KEY)
    assert cache.save_runtime_cache(MODEL, KEY, b"kernels" * 1000)
    assert cache.read_runtime_cache(MODEL, KEY) == b"kernels" * 1000
    path = cache.runtime_cache_path(MODEL, KEY)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "runtime_shim"):
        assert cache.read_runtime_cache(MODEL, KEY) is None
    assert "checksum mismatch" in caplog.text and "set aside" in caplog.text
    assert not path.exists() and len(list((tmp_path / LAYOUT / "corrupt").iterdir())) == 1
    path.write_bytes(b"garbage")
    assert cache.read_runtime_cache(MODEL, KEY) is None and not path.exists()


def test_concurrent_processes_never_see_a_torn_cache(tmp_path) -> None:
    procs = [_child("hammer", str(tmp_path), "15") for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert [o[0].strip() for o in outs] == ["BAD 0"] * 4
    final = UserCache("T", tmp_path).read_runtime_cache(MODEL, KEY)
    assert final is not None and hashlib.sha256(final[64:]).hexdigest().encode() == final[:64]
    assert not list((tmp_path / LAYOUT / "corrupt").iterdir())


def _temps(cache: UserCache) -> list[Path]:
    return sorted(p for p in cache.runtime_cache_path(MODEL, KEY).parent.iterdir() if p.name.endswith(".tmp"))


def test_a_process_killed_mid_save_leaves_the_old_cache_intact_and_its_temp_file_is_swept(tmp_path) -> None:
    cache = UserCache("T", tmp_path, lock_timeout=10)
    assert cache.save_runtime_cache(MODEL, KEY, b"old cache")
    proc = _child("die-mid-save", str(tmp_path))
    try:
        _wait_for(proc, "HALF")
        assert cache.read_runtime_cache(MODEL, KEY) == b"old cache"  # readers never wait for the lock
        [partial] = _temps(cache)
        assert cache.sweep() == [] and _temps(cache) == [partial]  # its writer is alive: left alone
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert cache.read_runtime_cache(MODEL, KEY) == b"old cache"
    assert _temps(cache) == [partial]  # what kill -9 leaves, until a later run sweeps it
    assert UserCache("T", tmp_path).sweep() == [partial] and _temps(cache) == []
    assert cache.save_runtime_cache(MODEL, KEY, b"new cache")  # the dead process's lock went with it
    assert cache.read_runtime_cache(MODEL, KEY) == b"new cache"


def test_the_sweep_leaves_what_is_not_a_killed_writers_temp_file(tmp_path) -> None:
    cache = UserCache("T", tmp_path)
    assert cache.save_runtime_cache(MODEL, KEY, b"kernels") and cache.save_engine("m-sm89", b"engine")
    folder = cache.runtime_cache_path(MODEL, KEY).parent
    keep = [folder / "notes.tmp", folder / ".x.rtcache.toolong123.tmp", cache.root / "engines" / ".e.engine.abc.tmp"]
    for p in keep:
        p.write_bytes(b"not ours")
    (folder / ".k.rtcache.abcd1234.tmp").symlink_to(tmp_path / "elsewhere")  # a link is never a writer's file
    stale = [folder / ".k.rtcache.abcd1234.tmp", cache.root / "engines" / ".m-sm89.engine.zz_z9876.tmp"]
    stale[1].write_bytes(b"half an engine")
    (cache.root / "verified").mkdir()
    (cache.root / "verified" / "0123.json").write_text("{}")  # a stamp of the retired verified-once shortcut
    assert cache.sweep() == [stale[1]]
    assert all(p.exists() for p in keep) and stale[0].is_symlink() and not stale[1].exists()
    assert not (cache.root / "verified").exists()
    assert cache.read_runtime_cache(MODEL, KEY) == b"kernels" and cache.read_engine("m-sm89") == b"engine"
    assert UserCache("T", tmp_path / "never-made").sweep() == []  # no cache dir yet: nothing made, nothing raised
    assert not (tmp_path / "never-made").exists()


def test_a_held_lock_is_named_at_warning_level_within_seconds_then_times_out(tmp_path, caplog) -> None:
    cache = UserCache("T", tmp_path, lock_timeout=2.5, wait_warn_after=0.5, wait_log_every=0.5)
    assert cache.writable
    proc = _child("hold", str(tmp_path), "rtcache-busy")
    proc2 = None
    try:
        _wait_for(proc, "HOLDING")
        with caplog.at_level(logging.INFO, "runtime_shim"), pytest.raises(CacheError) as err:
            with cache.lock("rtcache-busy"):
                pass
        holder = f"process {proc.pid}" if sys.platform.startswith("linux") else "another process"
        assert f"rtcache-busy.lock: still locked by {holder}" in str(err.value)
        assert "delete the lock file" in err.value.hint
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        # What it waits for (the lock file, who holds it, what for) and how long it will go on waiting.
        assert str(tmp_path / LAYOUT / "locks" / "rtcache-busy.lock") in warning.getMessage()
        assert f"held by {holder}" in warning.getMessage() and "saving the runtime cache" in warning.getMessage()
        assert "waiting up to 2 s more" in warning.getMessage()
        assert "still waiting for" in caplog.text  # then INFO lines
        # A save under a held lock gives up quietly: logged, False, never raised.
        from runtime_shim.cache_key import key_id

        proc2 = _child("hold", str(tmp_path), f"rtcache-{MODEL}-{key_id(KEY)}")
        _wait_for(proc2, "HOLDING")
        caplog.clear()
        with caplog.at_level(logging.WARNING, "runtime_shim"):
            assert cache.save_runtime_cache(MODEL, KEY, b"x") is False
        assert "runtime cache not saved" in caplog.text and "still locked" in caplog.text
    finally:
        for p in (proc, proc2):
            if p is not None:
                p.kill()
                p.wait()


def test_an_uncontended_lock_says_nothing(tmp_path, caplog) -> None:
    cache = UserCache("T", tmp_path)
    with caplog.at_level(logging.INFO, "runtime_shim"), cache.lock("rtcache-free"):
        pass
    assert "waiting" not in caplog.text


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> object:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_cache_dir_keeps_the_app_working(tmp_path, caplog) -> None:
    with _tmpfs(tmp_path / "ro", "1m") as mnt:
        UserCache("T", mnt).save_runtime_cache(MODEL, KEY, b"saved while writable")
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        cache = UserCache("T", mnt)
        with caplog.at_level(logging.WARNING, "runtime_shim"):
            assert not cache.writable
            assert cache.save_runtime_cache(MODEL, KEY, b"new") is False
        assert "cannot write the cache dir" in caplog.text
        assert cache.read_runtime_cache(MODEL, KEY) == b"saved while writable"  # reading still works
        assert cache.sweep() == []  # nothing to sweep, nothing raised


def test_full_disk_save_is_logged_not_raised(tmp_path, caplog) -> None:
    with _tmpfs(tmp_path / "full", "64k") as mnt:
        cache = UserCache("T", mnt)
        assert cache.save_runtime_cache(MODEL, KEY, b"small old cache")
        with caplog.at_level(logging.WARNING, "runtime_shim"):
            assert cache.save_runtime_cache(MODEL, KEY, os.urandom(200_000)) is False
        assert "No space left on device" in caplog.text
        assert cache.read_runtime_cache(MODEL, KEY) == b"small old cache"
        assert not [p for p in cache.runtime_cache_path(MODEL, KEY).parent.iterdir() if p.name.endswith(".tmp")]


def test_enospc_anywhere_in_the_write_is_logged_not_raised(tmp_path, monkeypatch, caplog) -> None:
    # Same as above without root: the write itself fails with ENOSPC.
    cache = UserCache("T", tmp_path)
    assert cache.save_runtime_cache(MODEL, KEY, b"old")

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("runtime_shim.user_cache.atomic_write", full)
    with caplog.at_level(logging.WARNING, "runtime_shim"):
        assert cache.save_runtime_cache(MODEL, KEY, b"new") is False
    assert "No space left on device" in caplog.text
    assert cache.read_runtime_cache(MODEL, KEY) == b"old"


def test_timing_of_an_uncontended_save_is_small(tmp_path) -> None:
    cache = UserCache("T", tmp_path)
    t0 = time.perf_counter()
    for _ in range(20):
        assert cache.save_runtime_cache(MODEL, KEY, b"k" * 100_000)
    assert time.perf_counter() - t0 < 10


def test_engines_built_here_are_checked_when_read_back(tmp_path) -> None:
    cache = UserCache("T", tmp_path)
    assert cache.read_engine("m-sm89") is None
    assert cache.save_engine("m-sm89", b"engine bytes") == cache.engine_path("m-sm89")
    assert cache.read_engine("m-sm89") == b"engine bytes"
    path = cache.engine_path("m-sm89")
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    assert cache.read_engine("m-sm89") is None and not path.exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs or /dev/zero on this system")
def test_a_saved_file_that_is_not_a_regular_file_is_set_aside_not_read(tmp_path, caplog) -> None:
    cache = UserCache("T", tmp_path)
    assert cache.writable
    path = cache.runtime_cache_path(MODEL, KEY)
    path.parent.mkdir(parents=True)
    os.mkfifo(path)  # a read would wait forever for a writer
    with caplog.at_level(logging.WARNING, "runtime_shim"):
        assert cache.read_runtime_cache(MODEL, KEY) is None
    assert "FIFO" in caplog.text and "set aside" in caplog.text and not path.exists()
    os.symlink("/dev/zero", path)  # a read would never end
    assert cache.read_runtime_cache(MODEL, KEY) is None and not path.exists()
    engine = cache.engine_path("m-sm89")
    engine.mkdir()
    assert cache.read_engine("m-sm89") is None and not engine.exists()
    assert cache.save_runtime_cache(MODEL, KEY, b"kernels") and cache.read_runtime_cache(MODEL, KEY) == b"kernels"
