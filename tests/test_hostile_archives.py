"""Hostile and faulty inputs to pack, unpack and merge, on real files and real processes: each ends in one clean
error naming the file (exit 1 from the CLI, no traceback, no hang) and nothing lost, or in a correct bundle.

Disk faults are real: ENOSPC and EROFS come from a small tmpfs mounted for the test (root with CAP_SYS_ADMIN;
skipped elsewhere), EACCES from a mode-0555 directory. As root, which ignores modes, the command runs in a child
whose capability bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so the kernel refuses it for real.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from bundler.archive import pack_bundle, unpack_bundle
from bundler.build import build_bundle
from bundler.bundle_io import verify_bundle
from bundler.config import make_options
from runtime_shim.errors import ArchiveError, BundleError
from runtime_shim.manifest import MANIFEST_NAME, read_manifest
from tests import models
from tests.test_merge import RTX4090, make_part

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30
posix_only = pytest.mark.skipif(os.name != "posix", reason="FIFOs, signals, mounts and flock are POSIX")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    build_bundle(
        models.make_mlp(root / "models"),
        root / "bundle",
        options=make_options(shapes=["x=1x64:4x64:16x64"], sms=[86, 89]),
        probe=lambda: SimpleNamespace(gpus=()),
    )
    return root / "bundle"


@pytest.fixture(scope="module")
def archive(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_bundle(bundle, tmp_path_factory.mktemp("packed") / "good.trtx").path


def _entries(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _raw_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """Headers written as given (sizes may lie about the data that follows), each data padded to 512 bytes."""
    with open(path, "wb") as f:
        for info, data in entries:
            f.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            f.write(data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    return path


def _engine_name(bundle: Path) -> str:
    (path,) = (bundle / "engines").iterdir()
    return f"engines/{path.name}"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".unpack-" in p.name or ".merge-" in p.name)


def _cli(*args: str, timeout: float = 120, drop_dac: bool = False) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process; a hang fails the test through the timeout instead of hanging the suite."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", "from bundler.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_drop_dac_capabilities if drop_dac and os.geteuid() == 0 else None,
    )


def _drop_dac_capabilities() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; gone from the bounding set, gone after exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _clean_failure(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, no traceback, one ERROR line that contains every needle; returns that line."""
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# --------------------------------------------------------------------------- archives: hole 3
def _sparse_pax(name: str, realsize: int) -> tuple[tarfile.TarInfo, bytes]:
    """A GNU sparse 1.0 member (pax headers + sparse map), as `tar --sparse --format=posix` writes: a few bytes
    of data that a plain tar reader expands to ``realsize`` bytes."""
    data = b"x" * 512
    sparse_map = f"1\n{realsize - len(data)}\n{len(data)}\n".encode()
    sparse_map += b"\0" * (-len(sparse_map) % 512)
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name.split('/')[-1]}")
    info.size = len(sparse_map) + len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    return info, sparse_map + data


def _lying_size(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size  # over 8 GiB: written as a pax "size" record
    return info, b"y" * 4096


def _pax_header_of(size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, size
    return info, b"30 comment=" + b"z" * 18 + b"\n"


def _manifest_with(raw: bytes) -> Callable[[list], list]:
    def edit(entries: list) -> list:
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(raw)
        return [(info, raw)] + entries[1:]

    return edit


# name: (edit of the good archive's entry list, what the one-line error must say)
ARCHIVE_CASES: dict[str, tuple[Callable[[list, str], list], str]] = {
    "sparse-50GiB-pinned-name": (
        lambda e, engine: [e[0], _sparse_pax(engine, 50 * GiB)] + [x for x in e[1:] if x[0].name != engine],
        "is a sparse file; refused before writing it",
    ),
    "size-lie-50GiB": (
        lambda e, engine: [e[0], _lying_size(engine, 50 * GiB)],
        f"is {50 * GiB} bytes, but manifest.json pins",
    ),
    "size-lie-short": (lambda e, engine: [e[0], _lying_size(engine, 10)], "is 10 bytes, but manifest.json pins"),
    "unpinned-name": (
        lambda e, engine: e + [_lying_size("engines/" + "e" * 64 + ".engine", 4096)],
        "a file that manifest.json does not pin",
    ),
    "manifest-not-first": (lambda e, engine: e[1:] + e[:1], "comes before manifest.json"),
    "manifest-100MiB": (lambda e, engine: [_lying_size(MANIFEST_NAME, 100 << 20)] + e[1:], "a manifest of 104857600"),
    "manifest-nested": (lambda e, engine: _manifest_with(b"[" * 100_000)(e), "nested too deeply"),
    "manifest-5000-digits": (
        lambda e, engine: _manifest_with(b'{"schema_version": ' + b"9" * 5000 + b"}")(e),
        "not valid JSON",
    ),
    "manifest-not-json": (lambda e, engine: _manifest_with(b"\xff\xfe garbage")(e), "not valid JSON"),
    "pax-header-1GiB": (lambda e, engine: [e[0], _pax_header_of(GiB)] + e[1:], "extended header of 1073741824"),
    "duplicate": (lambda e, engine: e + [x for x in e if x[0].name == engine], "appears twice"),
    "missing-file": (lambda e, engine: [x for x in e if x[0].name != engine], "not in the archive"),
    "empty": (lambda e, engine: [], "no manifest.json at the start"),
}


@pytest.mark.parametrize("case", sorted(ARCHIVE_CASES))
def test_hostile_archive_is_refused_before_writing(bundle: Path, archive: Path, tmp_path: Path, case: str) -> None:
    edit, expected = ARCHIVE_CASES[case]
    bad = _raw_tar(tmp_path / "bad.trtx", edit(_entries(archive), _engine_name(bundle)))
    with pytest.raises(BundleError) as e:
        unpack_bundle(bad, tmp_path / "out")
    assert expected in str(e.value) and str(bad) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.trtx"]  # no output, no temp dir, nothing else


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write GNU sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_member_from_gnu_tar(bundle: Path, tmp_path: Path, fmt: str) -> None:
    """The issue's case: a 50 GiB sparse file at a pinned path packs to a few KiB and used to be written out
    in full before anything was checked."""
    src = tmp_path / "src"
    engine = _engine_name(bundle)
    (src / "engines").mkdir(parents=True)
    shutil.copy(bundle / MANIFEST_NAME, src / MANIFEST_NAME)
    with open(src / engine, "wb") as f:
        f.truncate(50 * GiB)
    bad = tmp_path / "sparse.trtx"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(bad), MANIFEST_NAME, engine], cwd=src, check=True)
    assert bad.stat().st_size < 64 << 10
    r = _cli("unpack", str(bad), "-o", str(tmp_path / "out"))
    _clean_failure(r, str(bad), engine, "sparse file")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@posix_only
@pytest.mark.parametrize("kind", ["fifo", "directory", "dev-zero-link"])
def test_archive_that_is_not_a_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "a.trtx"
    if kind == "fifo":
        os.mkfifo(path)  # opening it plainly waits forever for a writer
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    expected = {"fifo": "is a FIFO", "directory": "is a directory", "dev-zero-link": "is a character device"}[kind]
    with pytest.raises(ArchiveError, match=expected):
        unpack_bundle(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    if kind == "fifo":
        _clean_failure(_cli("unpack", str(path), "-o", str(tmp_path / "out")), str(path), "FIFO")


def test_truncated_archives_at_every_kind_of_boundary(archive: Path, tmp_path: Path) -> None:
    """Cut inside a header, at a header's end, inside each file, one byte short: an error. A cut in the padding
    after the last file's data may also give the complete, correct bundle."""
    data = archive.read_bytes()
    entries = _entries(archive)
    data_end = entries[-1][0].offset_data + entries[-1][0].size
    cuts = {1, 511, 512, 1024, 1536, data_end - 1, data_end, data_end + 512, len(data) - 1}
    cuts |= {m.offset_data + m.size // 2 for m, _ in entries} | {m.offset + 100 for m, _ in entries}
    for cut in sorted(cuts):
        bad = tmp_path / f"cut-{cut}.trtx"
        bad.write_bytes(data[:cut])
        out = tmp_path / f"out-{cut}"
        try:
            unpack_bundle(bad, out)
        except BundleError:
            assert not out.exists()
        else:
            assert cut >= data_end and verify_bundle(out) == []
        assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- interrupted unpacks
_UNPACK_PAUSED = """
import sys, time
from pathlib import Path
import bundler.archive as b, runtime_shim.archive as a
real = a._extract_pinned
def pause(*args):
    real(*args)
    Path(sys.argv[3]).write_text("paused")
    time.sleep(120)
a._extract_pinned = pause
b.unpack_bundle(sys.argv[1], sys.argv[2])
"""


def _paused_unpack(archive: Path, out: Path, marker: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _UNPACK_PAUSED, str(archive), str(out), str(marker)], env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "unpack never reached the pause point"
        time.sleep(0.02)
    return proc


@posix_only
def test_ctrl_c_during_unpack_removes_its_temp_dir(archive: Path, tmp_path: Path) -> None:
    proc = _paused_unpack(archive, tmp_path / "out", tmp_path / "marker")
    assert len(_leftovers(tmp_path)) == 1  # every file extracted, not yet in place
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0
    assert b"KeyboardInterrupt" in proc.stderr.read()  # type: ignore[union-attr]
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


@posix_only
def test_kill_9_during_unpack_leaves_a_temp_dir_that_the_next_unpack_removes(archive: Path, tmp_path: Path) -> None:
    """Sweeps skip dirs younger than 30 s (the instant between mkdir and flock): the test ages the leftover."""
    proc = _paused_unpack(archive, tmp_path / "out", tmp_path / "marker")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (left,) = _leftovers(tmp_path)
    os.utime(tmp_path / left, (time.time() - 3600, time.time() - 3600))
    r = _cli("unpack", str(archive), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert _leftovers(tmp_path) == [] and verify_bundle(tmp_path / "out") == []


# --------------------------------------------------------------------------- parts: hole 6, merge side
@pytest.fixture
def merge_bundle(bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(bundle, tmp_path / "b")
    return tmp_path / "b"


def _nested(part_json: Path) -> None:
    part_json.write_bytes(b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")


def _digits(part_json: Path) -> None:
    data = json.loads(part_json.read_text())
    part_json.write_text(json.dumps(data).replace('"created": ', '"created": ' + "9" * 5000, 1))


def _absurd(field: str, value: object) -> Callable[[Path], None]:
    def edit(part_json: Path) -> None:
        data = json.loads(part_json.read_text())
        where = data
        *path, last = field.split(".")
        for key in path:
            where = where[key]
        where[last] = value
        part_json.write_text(json.dumps(data))

    return edit


def _replace(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        path.unlink()
        make(path)

    return edit


def _sparse(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(40 * GiB)


_PART_JSON = "part.json"
_CACHE = "cache file"
# name: (which file of the part, how it is damaged, what the one-line error must say)
PART_CASES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "part.json-fifo": (_PART_JSON, _replace(os.mkfifo), "is a FIFO"),
    "part.json-directory": (_PART_JSON, _replace(Path.mkdir), "is a directory"),
    "part.json-sparse-40GiB": (_PART_JSON, _replace(_sparse), f"{40 * GiB} bytes, more than"),
    "part.json-dev-zero": (_PART_JSON, _replace(lambda p: p.symlink_to("/dev/zero")), "is a character device"),
    "part.json-nested": (_PART_JSON, _nested, "nested too deeply"),
    "part.json-5000-digits": (_PART_JSON, _digits, "not valid JSON"),
    "part.json-empty": (_PART_JSON, lambda p: p.write_bytes(b""), "not valid JSON"),
    "part.json-list": (_PART_JSON, lambda p: p.write_text("[]"), "part.json"),
    "absurd-pci-id": (_PART_JSON, _absurd("runtime_cache.key.pci_device_id", 10**40), "pci_device_id"),
    "absurd-sm": (_PART_JSON, _absurd("runtime_cache.key.sm", 10**40), "sm"),
    "absurd-size": (_PART_JSON, _absurd("runtime_cache.file.size", 10**40), "size"),
    "negative-size": (_PART_JSON, _absurd("runtime_cache.file.size", -1), "size"),
    "float-size": (_PART_JSON, _absurd("runtime_cache.file.size", 1e300), "size"),
    "absurd-created": (_PART_JSON, _absurd("created", 10**40), "created"),
    "driver-5000-chars": (_PART_JSON, _absurd("runtime_cache.key.driver_version", "9" * 5000), "driver"),
    "cache-fifo": (_CACHE, _replace(os.mkfifo), "is a FIFO"),
    "cache-directory": (_CACHE, _replace(Path.mkdir), "is a directory"),
    "cache-sparse-40GiB": (_CACHE, _replace(_sparse), f"{40 * GiB} bytes, but"),
    "cache-dev-zero": (_CACHE, _replace(lambda p: p.symlink_to("/dev/zero")), "is a character device"),
}


@posix_only
@pytest.mark.parametrize("case", sorted(PART_CASES))
def test_hostile_part_is_a_clean_error(merge_bundle: Path, tmp_path: Path, case: str) -> None:
    which, damage, expected = PART_CASES[case]
    part = make_part(tmp_path / "part", merge_bundle, gpu=RTX4090)
    target = part / "part.json" if which == _PART_JSON else next((part / "caches").iterdir())
    damage(target)
    before = {p.relative_to(merge_bundle).as_posix(): p.stat().st_mtime_ns for p in merge_bundle.rglob("*")}
    r = _cli("merge", str(merge_bundle), str(part))
    line = _clean_failure(r, str(part))
    assert expected in line, line
    assert {p.relative_to(merge_bundle).as_posix(): p.stat().st_mtime_ns for p in merge_bundle.rglob("*")} == before
    assert _leftovers(tmp_path) == []


@posix_only
def test_bundle_manifest_that_is_a_fifo_is_a_clean_merge_error(merge_bundle: Path, tmp_path: Path) -> None:
    part = make_part(tmp_path / "part", merge_bundle, gpu=RTX4090)
    (merge_bundle / MANIFEST_NAME).unlink()
    os.mkfifo(merge_bundle / MANIFEST_NAME)
    _clean_failure(_cli("merge", str(merge_bundle), str(part)), str(merge_bundle / MANIFEST_NAME), "FIFO")


# --------------------------------------------------------------------------- full and read-only disks: hole 7
@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a real tmpfs (of ``size``, ``ro`` or not) under tmp_path; unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "1m", ro: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(where)
        return where

    if os.name != "posix" or shutil.which("mount") is None:
        pytest.skip("needs mount(8)")
    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> None:
    """Fill a file system to the last byte."""
    with open(where / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_pack_onto_a_full_disk_keeps_the_old_archive(bundle: Path, tmpfs: Callable[..., Path]) -> None:
    disk = tmpfs("full", size="1m")
    (disk / "b.trtx").write_bytes(b"the old archive")
    _fill(disk)
    line = _clean_failure(_cli("pack", str(bundle), "-o", str(disk / "b.trtx")), "No space left on device")
    assert str(disk) in line
    assert (disk / "b.trtx").read_bytes() == b"the old archive"
    assert sorted(p.name for p in disk.iterdir()) == ["b.trtx", "filler"]


def test_unpack_onto_a_full_disk(archive: Path, tmpfs: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmpfs("full", size="1m")
    _fill(disk)
    _clean_failure(_cli("unpack", str(archive), "-o", str(disk / "out")), str(disk), "bytes free, but the bundle needs")
    # The write path itself, with the free-space check out of the way: the kernel's ENOSPC mid-file.
    import runtime_shim.archive as archive_mod

    monkeypatch.setattr(archive_mod, "require_free_space", lambda *a, **k: None)
    with pytest.raises(BundleError, match="cannot unpack .* here: No space left on device") as e:
        unpack_bundle(archive, disk / "out")
    assert "disk is full" in (e.value.hint or "")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_merge_onto_a_full_disk(merge_bundle: Path, tmp_path: Path, tmpfs: Callable[..., Path]) -> None:
    part = make_part(tmp_path / "part", merge_bundle, cache=os.urandom(256 << 10))
    disk = tmpfs("full", size="1m")
    _fill(disk)
    _clean_failure(_cli("merge", str(merge_bundle), str(part), "-o", str(disk / "out")), "No space left on device")
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    assert fatal_free(merge_bundle)


@pytest.mark.parametrize("command", ["pack", "unpack", "merge -o", "merge in place"])
def test_read_only_file_system(
    merge_bundle: Path, archive: Path, tmp_path: Path, tmpfs: Callable[..., Path], command: str
) -> None:
    ro = tmpfs("ro", ro=True)
    if command == "pack":
        r = _cli("pack", str(merge_bundle), "-o", str(ro / "b.trtx"))
    elif command == "unpack":
        r = _cli("unpack", str(archive), "-o", str(ro / "out"))
    elif command == "merge -o":
        r = _cli("merge", str(merge_bundle), str(make_part(tmp_path / "p", merge_bundle)), "-o", str(ro / "out"))
    else:  # a bundle on a read-only disk: built elsewhere, then the disk mounted read-only
        rw = tmpfs("rw", size="4m")
        shutil.copytree(merge_bundle, rw / "b")
        part = make_part(tmp_path / "p", rw / "b")
        subprocess.run(["mount", "-o", "remount,ro", str(rw)], check=True)
        r = _cli("merge", str(rw / "b"), str(part))
        assert fatal_free(rw / "b") and read_manifest(rw / "b")[0].runtime_caches == ()
    line = _clean_failure(r, "Read-only file system")
    assert "read-only" in r.stderr.split("hint:", 1)[1], r.stderr
    assert str(tmp_path) in line
    assert list(ro.iterdir()) == []


@posix_only
@pytest.mark.parametrize("command", ["pack", "unpack", "merge -o", "merge in place"])
def test_permission_denied(merge_bundle: Path, archive: Path, tmp_path: Path, command: str) -> None:
    """A mode-0555 directory; as root the child runs without CAP_DAC_OVERRIDE (see the module docstring)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if command == "merge in place":
        shutil.copytree(merge_bundle, locked / "b")
        part = make_part(tmp_path / "p", locked / "b")
    locked.chmod(0o555)
    try:
        if command == "pack":
            r = _cli("pack", str(merge_bundle), "-o", str(locked / "b.trtx"), drop_dac=True)
        elif command == "unpack":
            r = _cli("unpack", str(archive), "-o", str(locked / "out"), drop_dac=True)
        elif command == "merge -o":
            part = make_part(tmp_path / "p", merge_bundle)
            r = _cli("merge", str(merge_bundle), str(part), "-o", str(locked / "out"), drop_dac=True)
        else:
            r = _cli("merge", str(locked / "b"), str(part), drop_dac=True)
        line = _clean_failure(r, "Permission denied", str(locked))
        assert "permission denied" in r.stderr.split("hint:", 1)[1], r.stderr
    finally:
        locked.chmod(0o755)
    expected = ["b"] if command == "merge in place" else []
    assert sorted(p.name for p in locked.iterdir()) == expected, line
    if command == "merge in place":
        assert fatal_free(locked / "b") and read_manifest(locked / "b")[0].runtime_caches == ()


def fatal_free(b: Path) -> bool:
    return [p for p in verify_bundle(b) if p.fatal] == []


# --------------------------------------------------------------------------- a fixed-seed mutation run
FUZZ_ROUNDS = int(os.environ.get("TRTX_FUZZ_ARCHIVE_ROUNDS", "150"))


def _pinned_files(root: Path) -> dict[str, bytes]:
    """Every file of a bundle but manifest.json, with its bytes."""
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    return {rel: p.read_bytes() for rel, p in files.items() if rel != MANIFEST_NAME}


def test_mutated_archives_end_in_a_clean_error_or_the_right_bundle(bundle: Path, archive: Path, tmp_path: Path) -> None:
    """Bytes flipped (headers and data), runs zeroed, cuts, and inserted blocks: every outcome is a BundleError or a
    bundle identical to the original. TRTX_FUZZ_ARCHIVE_ROUNDS sets the number of mutations (150 by default)."""
    rng = random.Random(11)
    good = archive.read_bytes()
    header_offsets = [0] + [m.offset for m, _ in _entries(archive)]
    outcomes = {"error": 0, "intact": 0, "manifest-edited": 0}
    for i in range(FUZZ_ROUNDS):
        data = bytearray(good)
        how = rng.choice(["flip-header", "flip-any", "zero-run", "cut", "insert"])
        if how == "flip-header":
            at = rng.choice(header_offsets) + rng.randrange(512)
            data[at] ^= 1 << rng.randrange(8)
        elif how == "flip-any":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == "zero-run":
            at = rng.randrange(len(data))
            end = min(len(data), at + rng.randrange(1, 600))
            data[at:end] = bytes(end - at)
        elif how == "cut":
            del data[rng.randrange(len(data)) :]
        else:
            at = rng.choice(header_offsets)
            data[at:at] = rng.randbytes(512)
        bad = tmp_path / f"m{i}.trtx"
        bad.write_bytes(bytes(data))
        out = tmp_path / f"out{i}"
        try:
            unpack_bundle(bad, out)
        except BundleError as e:
            assert str(e).count("\n") == 0 or "problem(s)" in str(e), str(e)
            assert not out.exists()
            outcomes["error"] += 1
        else:
            # Nothing pins manifest.json itself (it is the root of trust): an edit that still parses and pins the
            # same files unpacks as written, like any manifest-only edit. Every other file must be the original.
            assert [p for p in verify_bundle(out) if p.fatal] == []
            assert _pinned_files(out) == _pinned_files(bundle)
            same = (out / MANIFEST_NAME).read_bytes() == (bundle / MANIFEST_NAME).read_bytes()
            outcomes["intact" if same else "manifest-edited"] += 1
            shutil.rmtree(out)
        bad.unlink()
        assert _leftovers(tmp_path) == []
    assert outcomes["error"] > 0 and sum(outcomes.values()) == FUZZ_ROUNDS
    print(f"archive mutations: {outcomes}")


def test_archive_entries_written_by_hand_are_refused_in_bulk(archive: Path, tmp_path: Path) -> None:
    """Every tar entry type other than a regular file or a bundle folder, at every bundle path kind."""
    good = _entries(archive)
    types = [
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CONTTYPE,
        b"V",
        b"Z",
    ]
    refused = 0
    for t in types:
        for name in [MANIFEST_NAME] + [m.name for m, _ in good[1:]]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = t, "/etc/passwd" if t in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            entries = [good[0]] + [(info, b"" if t != tarfile.CONTTYPE else b"q")]
            bad = _raw_tar(tmp_path / "bad.trtx", entries if name != MANIFEST_NAME else [(info, b"")] + good[1:])
            with pytest.raises(BundleError):
                unpack_bundle(bad, tmp_path / "out")
            assert not (tmp_path / "out").exists()
            refused += 1
    assert refused == len(types) * len(good)


def _mutate_json(value: object, rng: random.Random) -> object:
    """One structural mutation somewhere in a JSON value: a key dropped, a value of another type, an absurd number."""
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(sorted(value))
        out = dict(value)
        if rng.random() < 0.15:
            del out[key]
        else:
            out[key] = _mutate_json(value[key], rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate_json(value[i], rng)] + value[i + 1 :]
    return rng.choice(
        [
            None,
            True,
            -1,
            0,
            2**64,
            10**40,
            1e308,
            -0.5,
            "",
            "9" * 300,
            "x",
            "ab" * 32,
            [],
            {},
            [[[[[]]]]],
            {"k": 1},
            value if not isinstance(value, str) else value + "0",
        ]
    )


PART_FUZZ_ROUNDS = int(os.environ.get("TRTX_FUZZ_PART_ROUNDS", "60"))


def test_mutated_part_json_ends_in_a_clean_error_or_a_sound_bundle(merge_bundle: Path, tmp_path: Path) -> None:
    """Fixed-seed structural mutations of a real part.json, each merged into a new directory: a BundleError, or a
    merged bundle that verifies. TRTX_FUZZ_PART_ROUNDS sets the number of mutations (60 by default)."""
    from bundler.merge import merge_parts

    rng = random.Random(11)
    part = make_part(tmp_path / "part", merge_bundle, gpu=RTX4090)
    good = json.loads((part / "part.json").read_text())
    outcomes = {"error": 0, "merged": 0}
    for i in range(PART_FUZZ_ROUNDS):
        (part / "part.json").write_text(json.dumps(_mutate_json(good, rng)))
        out = tmp_path / f"out{i}"
        try:
            merge_parts(merge_bundle, [part], out=out)
        except BundleError as e:
            assert str(e) and not out.exists()
            outcomes["error"] += 1
        else:
            assert [p for p in verify_bundle(out) if p.fatal] == []
            outcomes["merged"] += 1
            shutil.rmtree(out)
        assert _leftovers(tmp_path) == []
    assert fatal_free(merge_bundle) and outcomes["error"] > 0
    print(f"part.json mutations: {outcomes}")


@pytest.mark.parametrize("disk_kind", ["read-only", "full"])
@pytest.mark.parametrize("command", ["build", "run -o"])
def test_build_and_run_output_on_a_bad_disk(
    bundle: Path, tmp_path: Path, tmpfs: Callable[..., Path], command: str, disk_kind: str
) -> None:
    """Issue 11, hole 7: build and run -o write where the user says; a read-only or full disk is one ERROR line
    naming the place, and nothing is left there."""
    import numpy as np

    disk = tmpfs("ro", ro=True) if disk_kind == "read-only" else tmpfs("full", size="1m")
    if disk_kind == "full":
        _fill(disk)
    before = sorted(p.name for p in disk.iterdir())
    if command == "build":
        model = models.make_mlp(tmp_path / "m")
        r = _cli("build", str(model), "-o", str(disk / "b"), "--shape", "x=1x64:4x64:16x64", "--no-weightful")
    else:
        np.save(tmp_path / "x.npy", np.ones((16, 64), dtype=np.float32))
        env_cache = str(tmp_path / "cache")
        r = _cli(
            "run", str(bundle), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(disk / "out"), "--cache-dir", env_cache
        )
    want = "Read-only file system" if disk_kind == "read-only" else "No space left on device"
    line = _clean_failure(r, want)
    assert str(disk) in line
    assert sorted(p.name for p in disk.iterdir()) == before


# --------------------------------------------------------------------------- multi-model archives
@pytest.fixture(scope="module")
def multi_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle of three models, det and twin built from one ONNX file (so they pin one skeleton), and its archive."""
    from bundler.build import ModelSpec
    from bundler.config import BuildOptions

    root = tmp_path_factory.mktemp("multi")
    mlp, conv = models.make_mlp(root / "m"), models.make_conv(root / "m")
    batch = models.as_profiles({"x": ((1, 64), (4, 64), (16, 64))})
    image = models.as_profiles({"input": ((1, 3, 16, 16), (2, 3, 32, 32), (4, 3, 64, 64))})
    specs = [
        ModelSpec(source=mlp, name="det", profiles=batch),
        ModelSpec(source=conv, name="conv", profiles=image),
        ModelSpec(source=mlp, name="twin", profiles=batch),
    ]
    build_bundle(None, root / "bundle", options=BuildOptions(weightful=False, weightless=False), models=specs)
    return root / "bundle", pack_bundle(root / "bundle", root / "multi.trtx").path


def _with_models(edit: Callable[[list], None]) -> Callable[[list, str], list]:
    """An archive case: the manifest's models edited by ``edit``, every other entry as packed."""

    def case(entries: list, _shared: str) -> list:
        doc = json.loads(entries[0][1])
        edit(doc["models"])
        return _manifest_with(json.dumps(doc).encode())(entries)

    return case


def _grow_skeleton_pin(ms: list) -> None:
    ms[2]["skeleton"]["file"]["size"] += 1  # twin pins det's skeleton with another size


MULTI_CASES: dict[str, tuple[Callable[[list, str], list], str]] = {
    "same-name": (_with_models(lambda ms: ms[2].update(name="det")), "models[2].name: duplicate model name 'det'"),
    "one-path-two-sizes": (_with_models(_grow_skeleton_pin), "models[2].skeleton.file: pins skeleton/"),
    "name-100k": (_with_models(lambda ms: ms[1].update(name="n" * 100_000)), "expected at most 256 characters"),
    "no-models": (_with_models(lambda ms: ms.clear()), "models: expected at least one model"),
    "shared-file-twice": (lambda e, shared: e + [x for x in e if x[0].name == shared], "appears twice"),
    "shared-file-missing": (
        lambda e, shared: [x for x in e if x[0].name != shared],
        "not in the archive (pinned by models[0].skeleton.file)",
    ),
}


@pytest.mark.parametrize("case", sorted(MULTI_CASES))
def test_hostile_multi_model_archive_is_refused_before_writing(
    multi_archive: tuple[Path, Path], tmp_path: Path, case: str
) -> None:
    bundle, archive = multi_archive
    shared = read_manifest(bundle, "det")[0].skeleton.file.path
    edit, expected = MULTI_CASES[case]
    bad = _raw_tar(tmp_path / "bad.trtx", edit(_entries(archive), shared))
    with pytest.raises(BundleError) as e:
        unpack_bundle(bad, tmp_path / "out")
    assert expected in str(e.value) and str(bad) in str(e.value) and len(str(e.value)) < 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.trtx"]  # no output, no temp dir, nothing else
    if case == "same-name":  # the CLI: one ERROR line, exit 1; verify of the archive says the same
        _clean_failure(_cli("unpack", str(bad), "-o", str(tmp_path / "out")), "duplicate model name")
        r = _cli("verify", str(bad))
        assert r.returncode == 1 and "duplicate model name" in r.stdout and "Traceback" not in r.stderr


def test_thousands_of_models_in_an_archive_unpack_in_one_copy(multi_archive: tuple[Path, Path], tmp_path: Path) -> None:
    """3000 models pinning the same two files: every file is one entry, unpacked once; the CLI's lines stay short."""
    bundle, archive = multi_archive
    doc = json.loads((bundle / MANIFEST_NAME).read_bytes())
    doc["models"] = [dict(doc["models"][0], name=f"m{i}") for i in range(3000)]
    many = _raw_tar(tmp_path / "many.trtx", _manifest_with(json.dumps(doc).encode())(_entries(archive)))
    with pytest.raises(BundleError, match="does not pin"):  # conv's skeleton: pinned by no model any more
        unpack_bundle(many, tmp_path / "refused")
    kept = [x for x in _entries(archive) if x[0].name != read_manifest(bundle, "conv")[0].skeleton.file.path]
    many = _raw_tar(tmp_path / "many.trtx", _manifest_with(json.dumps(doc).encode())(kept))
    assert unpack_bundle(many, tmp_path / "out").names[-1] == "m2999"
    assert verify_bundle(tmp_path / "out") == []
    r = _cli("unpack", str(many), "-o", str(tmp_path / "out2"))
    assert r.returncode == 0 and "and 2995 more models" in r.stdout and len(r.stdout) < 500
    r = _cli("inspect", str(many), "--model", "nope")
    line = _clean_failure(r, "no model named 'nope'", "and 2980 more")
    assert len(line) < 1000
