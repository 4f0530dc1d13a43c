"""File helpers shared by both sides: the one atomic write, streaming sha256, bounded reads, owned temp dirs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import BundleError

try:
    import fcntl
except ImportError:  # Windows: no flock; owned temp dirs are then never swept (see sweep_stale_temp_dirs)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a unique temp file beside ``path``; on success fsync and ``os.replace`` it into place.

    Readers see the old file or the new one, never a torn one; on any error the temp file is removed
    and ``path`` is untouched. The temp name is unique, so concurrent writers never share a file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Return (hex sha256, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- bounded reads of small files
def file_kind(mode: int) -> str:
    """What a stat mode says a path is, in words (for errors about non-regular files)."""
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


def open_regular_file(
    path: str | os.PathLike[str], what: str, *, error: type[BundleError] = BundleError
) -> tuple[io.BufferedReader, int]:
    """Open ``path`` for reading only if it is a regular file; returns (file, size).

    The open itself never blocks: O_NONBLOCK makes a FIFO open at once (to be refused), where a plain open
    would wait forever for a writer. Links are followed (a bundle may be reached through one); what they
    point to must be a regular file, so a link to /dev/zero is refused too. FileNotFoundError is left to the
    caller (which knows what to hint); every other failure is ``error`` naming the path and ``what`` was expected.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a regular file (expected {what})") from None
    except OSError as e:
        if os.path.isdir(path):  # Windows refuses to open a directory with EACCES
            raise error(f"{path}: is a directory, not a regular file (expected {what})") from None
        raise error(f"{path}: cannot open ({e.strerror or e})", hint=os_error_hint(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: is a {file_kind(st.st_mode)}, not a regular file (expected {what})")
        if fcntl is not None and flags & getattr(os, "O_NONBLOCK", 0):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(
    path: str | os.PathLike[str], max_bytes: int, what: str, *, error: type[BundleError] = BundleError
) -> bytes:
    """The bytes of a small regular file, refused (``error``) before reading if it is not one or exceeds ``max_bytes``.

    Guards readers of manifests against a FIFO (would hang), a directory, a device or a huge or sparse file
    (would exhaust memory). The cap also holds for a file that grows while it is read.
    """
    f, size = open_regular_file(path, what, error=error)
    with f:
        if size > max_bytes:
            raise error(
                f"{path}: {size} bytes, more than the {max_bytes} allowed (expected {what})",
                hint="the file is not what it should be (damaged, or replaced); fetch or rebuild it",
            )
        chunks, total = [], 0
        try:
            while chunk := f.read(min(CHUNK, max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise error(f"{path}: grew past {max_bytes} bytes while being read (expected {what})")
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror or e})", hint=os_error_hint(e)) from None
    return b"".join(chunks)


def os_error_hint(e: OSError) -> str | None:
    """What a user can do about a failed file operation, by its errno; None where there is nothing useful to say."""
    return {
        errno.ENOSPC: "the disk is full: free some space or choose a place on another disk, then run it again",
        errno.EDQUOT: "the disk quota is used up: free some space or choose another place, then run it again",
        errno.EACCES: "permission denied: choose a place you may write to, or fix its permissions",
        errno.EPERM: "operation not permitted: choose a place you may write to, or fix its permissions",
        errno.EROFS: "the file system is read-only: choose a writable place",
        errno.EFBIG: "the file is too large for this file system, or for a limit set on this process",
        errno.EIO: "the disk reported an I/O error: check the disk, then run it again",
    }.get(e.errno or 0)


def os_error_path(e: OSError) -> str | None:
    """The file an OSError is about. A failed copy names its source first; a full or read-only disk is the target's."""
    if e.filename2 is not None and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return os.fsdecode(e.filename2)
    return None if e.filename is None else os.fsdecode(e.filename)


@contextlib.contextmanager
def disk_errors(
    target: str | os.PathLike[str], doing: str, kept: str, *, error: type[BundleError] = BundleError
) -> Iterator[None]:
    """An OSError while writing at ``target`` (full disk, read-only file system, permissions) becomes one ``error``
    naming the target, what failed, the file it failed on where that is another one, and what was kept."""
    try:
        yield
    except OSError as e:
        culprit = os_error_path(e)
        at = f" (at {culprit})" if culprit and culprit != str(target) else ""
        raise error(f"{target}: {doing}: {e.strerror or e}{at}; {kept}", hint=os_error_hint(e)) from None


# --------------------------------------------------------------------------- temp dirs that a later run can sweep
# A crashed writer (kill -9, power loss) leaves its temp dir behind. Each owned temp dir is flock-ed by its owner
# for as long as it lives, so a later run can tell a dead owner's dir (lock free) from a live one (lock held).
# A dir is also left alone while younger than the sweep's min_age_s: that covers the instant between the owner's
# mkdir and its flock. Where flock does not exist (Windows) nothing is swept.
_OWNED_SUFFIX = re.compile(r"^[0-9a-f]{12}$")


@contextlib.contextmanager
def owned_temp_dir(parent: str | os.PathLike[str], prefix: str) -> Iterator[Path]:
    """A new directory ``parent/<prefix><12 hex>``, locked while the block runs, then removed if still there.

    Made with plain mkdir (the user's umask), not mkdtemp's 0700, since callers rename it into place. The caller
    may rename or exchange it away; whatever is at the path when the block ends is removed.
    """
    parent = Path(parent)
    for _ in range(100):
        path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
        try:
            path.mkdir()
            break
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
    else:  # pragma: no cover
        raise FileExistsError(errno.EEXIST, "cannot create a unique temp directory", str(parent))
    fd = None
    try:
        if fcntl is not None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)  # releases the lock


def sweep_stale_temp_dirs(parent: str | os.PathLike[str], prefix: str, *, min_age_s: float = 30.0) -> list[Path]:
    """Remove the ``parent/<prefix><12 hex>`` dirs of :func:`owned_temp_dir` whose owner is gone; returns them.

    Never raises: a dir that cannot be examined or removed is logged and left.
    """
    if fcntl is None:
        return []
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix)]
    except OSError as e:
        log.debug("cannot list %s for stale temp dirs: %s", parent, e)
        return []
    for entry in entries:
        if not _OWNED_SUFFIX.match(entry.name[len(prefix) :]):
            continue  # not a name owned_temp_dir makes: never ours to remove
        path = Path(entry.path)
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or time.time() - st.st_mtime < min_age_s:
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            if os.fstat(fd).st_ino != st.st_ino:
                continue  # replaced since it was listed
            shutil.rmtree(path)
            removed.append(path)
            log.info("removed %s, left behind by a run that did not finish", path)
        except OSError as e:
            log.warning("cannot remove the stale temp dir %s: %s", path, e.strerror or e)
        finally:
            os.close(fd)
    return removed


# --------------------------------------------------------------------------- who holds a lock
def lock_holder(path: str | os.PathLike[str]) -> str | None:
    """Which process holds a lock (flock or fcntl) on ``path``, as "process 1234 (name)", where this system says so
    (Linux: /proc/locks); None where it cannot be known. For messages only: never raises."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:573489 0 EOF"; waiters are listed as "1: -> FLOCK ..."
        if len(fields) >= 6 and fields[1] != "->" and fields[5].endswith(f":{st.st_ino}"):
            exact = fields[5] == dev
            pids.append((not exact, fields[4]))
    if not pids:
        return None
    pid = sorted(pids)[0][1]
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            name = f.read(64).strip()
    except OSError:
        name = ""
    return f"process {pid}" + (f" ({name})" if name else "")


# --------------------------------------------------------------------------- writers of a whole bundle directory
def bundle_lock_path(bundle: Path) -> Path:
    """The writer lock of a (resolved) bundle directory that merge, sign, upgrade and apply_update take: beside the
    directory, since the directory itself gets exchanged."""
    return bundle.parent / f".{bundle.name}.merge.lock"


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE). False where that is not available, and the
    caller moves files in instead."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False  # glibc < 2.28, or a libc without it
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    log.debug("renameat2(RENAME_EXCHANGE) failed: %s; moving files in instead", os.strerror(ctypes.get_errno()))
    return False


def require_free_space(where: Path, need: int, *, needs: str, hint: str) -> None:
    """BundleError when the disk holding ``where`` has fewer than ``need`` bytes free, before anything is written
    (``needs`` completes "N bytes free, but ..."). A disk whose usage cannot be read is not refused."""
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        return
    if usage.total and usage.free < need:
        raise BundleError(f"{where}: {usage.free} bytes free, but {needs}", hint=hint)
