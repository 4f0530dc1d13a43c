"""Writing an applied update: files into a stage beside the bundle, one writer at a time, then all of NEW or none.

NEW is built in a temp directory beside the target, then committed with one rename (to a new directory) or, in
place, by atomically exchanging it with the bundle directory (Linux ``renameat2(RENAME_EXCHANGE)``); a failure or a
kill before that leaves the bundle as it was. Where no atomic exchange exists (Windows, some file systems) NEW's files
are moved in, the old signature set aside and manifest.json replaced last, then the files only OLD pinned removed: a
crash leaves the old manifest with every file it pins, or the new one with every file it pins (plus files no manifest
lists, which ``verify`` reports). The temp directory of a killed apply is removed by the next one beside it
(fsutil.owned_temp_dir). The lock is the file ``merge`` takes beside the bundle, so updates and merges take turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .delta_format import NOT_A_DELTA
from .errors import BundleError, DeltaError, IntegrityError
from .fsutil import (
    CHUNK,
    disk_errors,
    open_regular_file,
    os_error_hint,
    owned_temp_dir,
    require_free_space,
    sweep_stale_temp_dirs,
)
from .fsutil import bundle_lock_path as lock_path
from .fsutil import exchange_dirs as _exchange  # a module name of its own: tests switch it off
from .manifest import FILE_FOLDERS, MANIFEST_NAME, BundleManifest, FileRef
from .signing import SIGNATURE_NAME

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def lock_for(bundle: Path, *, required: bool, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the bundle's writer lock. ``required=False`` (only reading the bundle): go on without it where the lock
    file cannot be made (a read-only place)."""
    import filelock

    held = None
    if bundle.is_dir():
        path = lock_path(bundle)
        lock = filelock.FileLock(str(path), thread_local=False)
        try:
            lock.acquire(timeout=timeout)
            held = lock
        except filelock.Timeout:
            raise BundleError(
                f"{path}: still locked after {timeout:.0f} s: a merge or another update of {bundle} is running",
                hint="wait for it to finish and apply again; if none is running, delete that lock file",
            ) from None
        except OSError as e:
            if required:
                raise BundleError(
                    f"{path}: cannot create the bundle's lock ({e.strerror or e}); the bundle was left as it was",
                    hint=os_error_hint(e) or "apply the update to a copy with -o OUT",
                ) from None
            log.debug("no lock for %s (%s); reading it without one", bundle, e)
    try:
        yield
    finally:
        if held is not None:
            held.release()


def commit(
    bundle: Path,
    target: Path,
    old: BundleManifest,
    new: BundleManifest,
    *,
    in_place: bool,
    kept: str,
    space: int,
    build: Callable[[Path], None],
) -> None:
    """``build(stage)`` writes NEW into a temp directory beside ``target``; then it is put in place (module doc)."""
    with disk_errors(target, "cannot write the updated bundle", kept):
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        require_free_space(
            parent,
            space,
            needs=f"the updated bundle needs {space} more; {kept}",
            hint="free some space, or apply the update with -o to a place on another disk",
        )
        prefix = f".{target.name}.apply-"
        for stale in sweep_stale_temp_dirs(parent, prefix):
            log.info("removed %s, left behind by an update that did not finish", stale)
        with owned_temp_dir(parent, prefix) as stage:
            if in_place:
                os.chmod(stage, bundle.stat().st_mode & 0o7777)  # the bundle keeps its own mode
            build(stage)
            for d in [*(stage / f for f in FILE_FOLDERS), stage]:
                _fsync_dir(d)
            if not in_place:
                if target.exists():
                    target.rmdir()  # empty (checked before): os.rename cannot replace a directory on Windows
                os.rename(stage, target)
                return
            if _exchange(stage, bundle):
                return  # the stage now holds OLD; owned_temp_dir removes it
            _move_in(stage, bundle, new, {ref.path for _key, ref in old.files()})


def _fsync_dir(path: Path) -> None:
    if not path.is_dir():
        return
    with contextlib.suppress(OSError):  # Windows cannot open a directory to sync it; its renames are durable anyway
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_in(stage: Path, bundle: Path, new: BundleManifest, old_paths: set[str]) -> None:
    """NEW's files moved into the bundle, the old signature set aside, manifest.json replaced last, then OLD's own
    files removed; an error before the manifest is replaced takes the moved files out again."""
    pinned = {ref.path for _key, ref in new.files()}
    placed: list[Path] = []
    signature, set_aside = bundle / SIGNATURE_NAME, stage / f".old.{SIGNATURE_NAME}"
    try:
        for rel in sorted(pinned):
            dest = bundle / rel
            if dest.exists():
                continue  # same name, same content (the name is its sha256, checked while building)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dest)
            placed.append(dest)
        if os.path.lexists(signature):
            os.replace(signature, set_aside)  # never an old signature beside a new manifest
        os.replace(stage / MANIFEST_NAME, bundle / MANIFEST_NAME)
    except BaseException:
        for p in placed:
            p.unlink(missing_ok=True)
        if os.path.lexists(set_aside):
            os.replace(set_aside, signature)
        raise
    if (stage / SIGNATURE_NAME).exists():
        os.replace(stage / SIGNATURE_NAME, signature)
    for rel in sorted(old_paths - pinned):
        with contextlib.suppress(OSError):
            (bundle / rel).unlink()


# --------------------------------------------------------------------------- files written into the stage
def reuse(src: Path, dest: Path, ref: FileRef, key: str, *, link: bool, advance: Callable[[int], None]) -> None:
    """A file NEW shares with OLD: hard-linked (then read once to check it) or copied and checked in one pass."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    f, _size = open_regular_file(src, f"a bundle file pinned with {ref.size} bytes", error=IntegrityError)
    with f, checked(src, ref, key, None) as h:
        out = None
        if link and not src.is_symlink():
            try:
                os.link(src, dest)
            except OSError:
                out = create(dest)
        else:
            out = create(dest)
        with out or contextlib.nullcontext():
            while chunk := f.read(CHUNK):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
                advance(len(chunk))


class _Hash:
    def __init__(self) -> None:
        self.h, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.h.update(data)
        self.size += len(data)


@contextlib.contextmanager
def checked(path: Path, ref: FileRef, key: str, delta: Path | None) -> Iterator[_Hash]:
    """The bytes fed to the yielded hash must be exactly what ``ref`` pins (IntegrityError, DeltaError otherwise)."""
    h = _Hash()
    yield h
    if (h.h.hexdigest(), h.size) != (ref.sha256, ref.size):
        what = f"sha256 {h.h.hexdigest()} ({h.size} bytes), expected {ref.sha256} ({ref.size} bytes, NEW's {key})"
        if delta is not None:
            raise DeltaError(f"{delta}: the {ref.path} it makes has {what}", hint=NOT_A_DELTA)
        raise IntegrityError(
            f"{path}: {what}: the bundle's file is damaged",
            hint="run 'trtx-bundle verify' on the bundle; fetch the whole new bundle instead of the update",
        )


def create(path: Path) -> SyncedFile:
    """A new file in the stage, synced on close (O_EXCL: never opens something already there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    return SyncedFile(os.fdopen(fd, "wb"))


class SyncedFile:
    """A file written whole, then flushed to disk as it is closed (a crash after the commit never finds it empty)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.write = f.write

    def __enter__(self) -> SyncedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.f.flush()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()
