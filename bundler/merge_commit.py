"""Writing a merge: one merge of a bundle at a time (a lock), then all of the new bundle or none of it.

The new bundle is assembled in a temp directory beside the target (existing files hard-linked, part files
copied while their sha256 is checked), then committed with one rename: to ``-o OUT``, or, in place, by
atomically exchanging it with the bundle directory (Linux ``renameat2(RENAME_EXCHANGE)``). A crash before
that point leaves the bundle exactly as it was. Where no atomic exchange exists (Windows, some file systems)
the new files are moved in, the old signature (manifest.sig) set aside and manifest.json replaced last: a crash
then leaves the old manifest with every file it pins intact (unsigned if the crash came between the two), but
possibly unlisted files that ``verify`` reports as extra. A new bundle never carries the old signature.

A crash also leaves the temp directory; it is flock-ed while its merge lives, so the next merge beside it
removes it once its owner is gone (fsutil.owned_temp_dir). Merges of one bundle are serialized by a lock
file beside it: the second one waits, then reads the bundle as the first left it, so no part is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runtime_shim.errors import BundleError, IntegrityError
from runtime_shim.fsutil import (
    CHUNK,
    atomic_write,
    atomic_writer,
    disk_errors,
    open_regular_file,
    os_error_hint,
    owned_temp_dir,
    sweep_stale_temp_dirs,
)
from runtime_shim.fsutil import (
    bundle_lock_path as lock_path,
)
from runtime_shim.fsutil import exchange_dirs as _exchange  # a module name of its own: tests switch it off
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest, FileRef
from runtime_shim.signing import SIGNATURE_NAME

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 600.0
WAIT_NOTICE_S = 2.0  # say what we wait for once a lock has been held this long, then every WAIT_REPEAT_S
WAIT_REPEAT_S = 30.0


class MergeError(BundleError):
    """A part does not belong in this bundle (another bundle, another TRT-RTX version) or cannot be merged."""


def stage_prefix(target: Path) -> str:
    return f".{target.name}.merge-"


@contextlib.contextmanager
def bundle_lock(
    bundle: Path, *, required: bool, say: Callable[[str], None], timeout: float = LOCK_TIMEOUT_S
) -> Iterator[None]:
    """Hold the merge lock of ``bundle`` (resolved); says what it waits for after WAIT_NOTICE_S; MergeError on timeout.

    ``required=False`` (a merge to ``-o OUT`` only reads the bundle): where the lock file cannot be made (a
    read-only place, which no in-place merge can change either), go on without it.
    """
    import filelock  # only merges need it

    if not bundle.is_dir():
        yield  # nothing to lock: reading its manifest will say what is wrong
        return
    path = lock_path(bundle)
    lock = filelock.FileLock(str(path), thread_local=False)
    start, next_notice = time.monotonic(), WAIT_NOTICE_S
    while True:
        waited = time.monotonic() - start
        try:
            lock.acquire(timeout=max(0.0, min(next_notice, timeout) - waited))
            break
        except filelock.Timeout:
            waited = time.monotonic() - start
            if waited >= timeout:
                raise MergeError(
                    f"{path}: still locked after {waited:.0f} s: another merge into {bundle} is running",
                    hint="wait for it to finish and merge again; if no merge is running, delete that lock file",
                ) from None
            say(f"waiting for another merge into {bundle} to finish (lock {path} held, {waited:.0f} s so far)")
            next_notice = waited + WAIT_REPEAT_S
        except OSError as e:
            if not required:
                log.debug("no merge lock for %s (%s); merging to another directory without it", bundle, e)
                yield
                return
            raise MergeError(
                f"{path}: cannot create the merge lock ({e.strerror or e}); the bundle was left as it was",
                hint=os_error_hint(e) or "merge into a copy of the bundle with -o OUT",
            ) from None
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- commit
def commit(
    bundle: Path,
    target: Path,
    manifest: BundleManifest,
    new_files: dict[str, tuple[Path, FileRef]],
    dropped: set[str],
    *,
    in_place: bool,
    say: Callable[[str], None],
) -> None:
    """Write the merged bundle (see the module docstring); disk errors become MergeError, the bundle left as it was."""
    kept = "the bundle was left as it was" if in_place else "nothing was written"
    with disk_errors(target, "cannot write the merged bundle", kept, error=MergeError):
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in sweep_stale_temp_dirs(target.parent, stage_prefix(target)):
            say(f"removed {stale}, left behind by a merge that did not finish")
        with owned_temp_dir(target.parent, stage_prefix(target)) as stage:
            _commit(bundle, target, stage, manifest, new_files, dropped, in_place=in_place, say=say)


def _commit(
    bundle: Path,
    target: Path,
    stage: Path,
    manifest: BundleManifest,
    new_files: dict[str, tuple[Path, FileRef]],
    dropped: set[str],
    *,
    in_place: bool,
    say: Callable[[str], None],
) -> None:
    os.chmod(stage, bundle.stat().st_mode & 0o7777)  # the bundle keeps its own mode
    for _where, ref in manifest.files():
        dest = stage / ref.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        if ref.path in new_files:
            src_dir, _ = new_files[ref.path]
            _copy_verified(src_dir / ref.path, dest, ref)
        elif not dest.exists():
            _link_or_copy(bundle / ref.path, dest)
    atomic_write(stage / MANIFEST_NAME, manifest.to_json())
    if not in_place:
        if target.exists():
            target.rmdir()  # empty (checked before): os.rename cannot replace a directory on Windows
        os.rename(stage, target)
        say(f"merged bundle written to {target}")
        return
    if _exchange(stage, bundle):
        say(f"bundle {bundle} updated (atomic directory exchange)")
        return  # `stage` now holds the old bundle; owned_temp_dir removes it
    _move_in(stage, bundle, manifest, new_files, dropped)
    say(f"bundle {bundle} updated (files moved in, manifest replaced last)")


def _copy_verified(src: Path, dest: Path, ref: FileRef) -> None:
    """Copy and hash in one pass: what lands in the bundle is exactly what part.json pins, or nothing."""
    h, size = hashlib.sha256(), 0
    f, _size = open_regular_file(src, f"a part file pinned with {ref.size} bytes", error=IntegrityError)
    with f, atomic_writer(dest) as out:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if size > ref.size:
                break  # growing past the pin: no need to copy the rest
            out.write(chunk)
        if (h.hexdigest(), size) != (ref.sha256, ref.size):
            raise IntegrityError(
                f"{src}: changed while merging: sha256 {h.hexdigest()} ({size} bytes), expected {ref.sha256} ({ref.size} bytes)",
                hint="something is writing to the part directory; merge again once it is done",
            )


def _link_or_copy(src: Path, dest: Path) -> None:
    # Hard links are safe: nothing in a bundle is ever written in place, only replaced.
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _move_in(
    stage: Path, bundle: Path, manifest: BundleManifest, new_files: dict[str, tuple[Path, FileRef]], dropped: set[str]
) -> None:
    """Move the new files into the bundle, then replace manifest.json; on an error, take the moved files out again."""
    placed: list[Path] = []
    signature, set_aside = bundle / SIGNATURE_NAME, stage / SIGNATURE_NAME
    try:
        for rel in sorted(new_files):
            dest = bundle / rel
            if dest.exists():
                continue  # same name, same content
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dest)
            placed.append(dest)
        # The old signature goes before the new manifest comes: never a stale signature beside a new manifest.
        if os.path.lexists(signature):
            os.replace(signature, set_aside)
        atomic_write(bundle / MANIFEST_NAME, manifest.to_json())
    except BaseException:
        for p in placed:
            p.unlink(missing_ok=True)
        if os.path.lexists(set_aside):
            os.replace(set_aside, signature)  # the old manifest stays, so its signature does too
        raise
    for rel in sorted(dropped):  # caches a conflict replaced: no longer listed, so they must go
        (bundle / rel).unlink(missing_ok=True)
