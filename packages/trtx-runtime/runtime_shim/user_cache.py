"""The per-user cache dir: runtime caches, engines built here, the temp dir of a model written out for a build.

Correctness comes from unique temp names plus ``os.replace`` (readers see a whole old file or a whole new one);
the locks, in their own folder, only stop two processes from doing the same work or losing each other's
newest cache. Saving is best effort: a failure is logged, never raised into the app. A file that fails its
checksum is set aside in ``corrupt/`` and ignored. What a killed writer leaves (temp files, temp dirs) is swept
by a later load, under the same lock the writer held: a free lock means its writer is gone.

Layout (the ``v1`` folder is the layout version; a later layout gets a new folder beside it)::

    <cache dir>/CACHEDIR.TAG
    <cache dir>/trtx-v1/runtime-caches/<model id>/<key id>.rtcache
    <cache dir>/trtx-v1/engines/<name>.engine
    <cache dir>/trtx-v1/tmp/trtx-model-<12 hex>/             (a model written out for one TRT-RTX build, then removed)
    <cache dir>/trtx-v1/locks/<name>.lock
    <cache dir>/trtx-v1/corrupt/
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .cache_key import key_id
from .errors import CacheError
from .fsutil import atomic_write, lock_holder, read_regular_file, sha256_bytes
from .manifest import CacheKey

log = logging.getLogger(__name__)

ENV_VAR = "TRTX_CACHE_DIR"
LAYOUT = "trtx-v1"
_MAGIC = b"TRTX-CACHED 1\n"  # then one JSON header line (sha256, size, key), then the payload
# What each lock guards, by the first word of its name (for the message a waiting user sees).
_LOCK_PURPOSE = {
    "rtcache": "saving the runtime cache",
    "engine": "keeping an engine built on this machine",
}
# The temp name atomic_write (fsutil.atomic_writer) gives a runtime cache or an engine while it is written.
_TEMP_FILE = re.compile(r"^\.(?P<stem>.+)\.(?P<ext>rtcache|engine)\.[a-z0-9_]{8}\.tmp$")
MAX_RUNTIME_CACHE = 4 << 30  # TRT-RTX runtime caches are tens to hundreds of MB
MAX_ENGINE = 64 << 30
_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This directory holds caches made by an app embedding trtx-bundler's runtime shim.\n"
    b"# It can be deleted at any time; it is rebuilt on the next run.\n"
)


def default_cache_dir(app: str) -> Path:
    """``$TRTX_CACHE_DIR`` when set, else the platform's user cache dir for ``app`` (e.g. ~/.cache/<app>)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    import platformdirs  # only here: an app that passes cache_dir never needs it

    return Path(platformdirs.user_cache_dir(app, appauthor=False))


class UserCache:
    def __init__(
        self,
        app: str,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        lock_timeout: float = 60.0,
        wait_warn_after: float = 1.5,
        wait_log_every: float = 5.0,
    ) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(app)
        self.root = self.dir / LAYOUT
        self.lock_timeout = lock_timeout
        self.wait_warn_after = wait_warn_after
        self.wait_log_every = wait_log_every
        self.problem: str | None = None  # why nothing can be written here (read-only, full, ...)
        self._ready = False

    # ----------------------------------------------------------------------------------- setup
    @property
    def writable(self) -> bool:
        return self._ensure()

    def _ensure(self) -> bool:
        if self._ready or self.problem is not None:
            return self._ready
        try:
            for sub in ("runtime-caches", "engines", "locks", "corrupt"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            tag = self.dir / "CACHEDIR.TAG"
            if not tag.exists():
                atomic_write(tag, _TAG)
            probe_fd, probe_path = tempfile.mkstemp(
                prefix=".write-test.", dir=self.root
            )  # mkdir succeeds on a read-only existing tree
            os.close(probe_fd)
            os.unlink(probe_path)
            self._ready = True
        except OSError as e:
            self.problem = (
                f"{self.dir}: cannot write the cache dir ({e.strerror or e}); the app runs on without saving caches"
            )
            log.warning("%s (set %s or pass cache_dir= to use another place)", self.problem, ENV_VAR)
        return self._ready

    # ----------------------------------------------------------------------------------- locks
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float | None = None) -> Iterator[None]:
        """Hold ``locks/<name>.lock``; CacheError after ``timeout`` seconds (default lock_timeout).

        A wait is never silent: after ``wait_warn_after`` seconds a WARNING (shown by the CLI at its default
        verbosity) names the lock file, the process holding it where the system says, what the lock guards and how
        long this process will go on waiting; then an INFO line every ``wait_log_every`` seconds.
        """
        import filelock  # only the writing paths need it

        if not self._ensure():
            raise CacheError(self.problem or f"{self.dir}: not writable")
        path = self.root / "locks" / f"{name}.lock"
        timeout = self.lock_timeout if timeout is None else timeout
        lock = filelock.FileLock(str(path), thread_local=False)
        start, step, warned = time.monotonic(), self.wait_warn_after, False
        while True:
            remaining = timeout - (time.monotonic() - start)
            try:
                lock.acquire(timeout=max(0.0, min(step, remaining)))
                break
            except filelock.Timeout:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise CacheError(
                        f"{path}: still locked by {lock_holder(path) or 'another process'} after {waited:.0f} s "
                        f"(timeout {timeout:.0f} s)",
                        hint="another copy of the app may be saving its cache; if none is running, delete the lock file",
                    ) from None
                holder = lock_holder(path) or "another process"
                if not warned:
                    log.warning(
                        "waiting for %s, held by %s (%s); waiting up to %.0f s more",
                        path,
                        holder,
                        _LOCK_PURPOSE.get(name.split("-", 1)[0], "a cache update"),
                        timeout - waited,
                    )
                    warned = True
                else:
                    log.info(
                        "still waiting for %s (held by %s, %.0f s so far, at most %.0f s)",
                        path,
                        holder,
                        waited,
                        timeout,
                    )
                step = self.wait_log_every
        if warned:
            log.info("%s is free after %.1f s", path, time.monotonic() - start)
        try:
            yield
        finally:
            lock.release()

    # ----------------------------------------------------------------------------------- what killed runs left
    def sweep(self) -> list[Path]:
        """Remove the temp files of runtime caches and engines whose writer was killed mid-write, and the stamps of the
        retired "verified once" shortcut; returns what was removed. Never raises; never waits for a lock.

        Such a temp file is made and renamed away while its writer holds the lock of that cache entry, so one whose
        lock is free belongs to a writer that is gone. It is removed while this process holds that lock; a live
        writer's file is left alone. Works wherever the locks do (flock on POSIX, LockFileEx on Windows).
        """
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        candidates = [
            (Path(e.path), f"rtcache-{d.name}-{m['stem']}")
            for d in _entries(self.root / "runtime-caches")
            if d.is_dir(follow_symlinks=False)
            for e in _entries(Path(d.path))
            if (m := _TEMP_FILE.match(e.name)) and m["ext"] == "rtcache"
        ]
        candidates += [
            (Path(e.path), f"engine-{m['stem']}")
            for e in _entries(self.root / "engines")
            if (m := _TEMP_FILE.match(e.name)) and m["ext"] == "engine"
        ]
        for path, lock_name in candidates:
            try:
                with self.lock(lock_name, timeout=0):
                    if not stat.S_ISREG(path.lstat().st_mode):
                        continue  # not what a writer makes (links are never followed)
                    path.unlink()
                removed.append(path)
                log.info("removed %s, left by a run killed while writing it", path)
            except CacheError:
                continue  # its writer holds the lock: alive
            except OSError as e:
                log.info("cannot remove %s, left by a run killed while writing it: %s", path, e.strerror or e)
        with contextlib.suppress(OSError):  # stamps of a retired shortcut: a file's identity does not promise its bytes
            if (self.root / "verified").is_dir():
                shutil.rmtree(self.root / "verified")
        return removed

    # ----------------------------------------------------------------------------------- runtime caches
    def runtime_cache_path(self, model_id: str, key: CacheKey) -> Path:
        return self.root / "runtime-caches" / model_id / f"{key_id(key)}.rtcache"

    def has_runtime_cache(self, model_id: str, key: CacheKey) -> bool:
        return self.runtime_cache_path(model_id, key).is_file()

    def read_runtime_cache(self, model_id: str, key: CacheKey) -> bytes | None:
        """The cache saved for this key, or None (absent, unreadable, or corrupt: then set aside)."""
        path = self.runtime_cache_path(model_id, key)
        data = self._read_own(path, MAX_RUNTIME_CACHE, "a runtime cache saved by this shim")
        if data is None:
            return None
        payload, why = _unframe(data, key.to_dict())
        if why is not None:
            self._set_aside(path, why)
            return None
        return payload

    def save_runtime_cache(self, model_id: str, key: CacheKey, data: bytes) -> bool:
        """Replace the saved cache atomically under its lock. Never raises: a failure is logged and False returned."""
        path = self.runtime_cache_path(model_id, key)
        try:
            if not self._ensure():
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            with self.lock(f"rtcache-{model_id}-{key_id(key)}"):
                atomic_write(path, _frame(data, key.to_dict()))
            log.info("saved the runtime cache (%d bytes) to %s", len(data), path)
            return True
        except CacheError as e:
            log.warning("runtime cache not saved: %s", e)
        except OSError as e:
            log.warning("runtime cache not saved to %s: %s", path, e.strerror or e)
        except Exception as e:
            log.warning("runtime cache not saved to %s: %r", path, e)
        return False

    def _read_own(self, path: Path, max_bytes: int, what: str) -> bytes | None:
        """A file this shim saved here, or None: absent, unreadable (logged), or not a regular file of a sane size
        (set aside: a FIFO would hang the read, a huge or sparse file exhaust memory)."""
        try:
            return read_regular_file(path, max_bytes, what, error=CacheError)
        except FileNotFoundError:
            return None
        except CacheError as e:
            try:
                odd = path.is_symlink() or not path.is_file() or path.stat().st_size > max_bytes
            except OSError:
                odd = False
            if odd:
                self._set_aside(path, str(e).removeprefix(f"{path}: "))
            else:  # a regular file that cannot be read (permissions, I/O error): leave it, say so
                log.warning("%s; it is made afresh", e)
            return None

    def _set_aside(self, path: Path, why: str) -> None:
        target = self.root / "corrupt" / f"{path.name}.{int(time.time())}.{os.getpid()}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            log.warning("%s: %s; set aside as %s and ignored", path, why, target)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()
            log.warning("%s: %s; ignored", path, why)

    # ----------------------------------------------------------------------------------- engines built here
    def engine_path(self, name: str) -> Path:
        return self.root / "engines" / f"{name}.engine"

    def read_engine(self, name: str) -> bytes | None:
        """An engine built here earlier, checked against the checksum saved with it (engines hold executable code)."""
        path = self.engine_path(name)
        data = self._read_own(path, MAX_ENGINE, "an engine saved by this shim")
        if data is None:
            return None
        payload, why = _unframe(data, {"engine": name})
        if why is not None:
            self._set_aside(path, why)
        return payload

    def save_engine(self, name: str, data: bytes) -> Path | None:
        path = self.engine_path(name)
        try:
            if not self._ensure():
                return None
            with self.lock(f"engine-{name}"):
                atomic_write(path, _frame(data, {"engine": name}))
            return path
        except (CacheError, OSError) as e:
            log.warning("engine built here not kept in the cache (%s); it will be built again next time", e)
            return None

    # ----------------------------------------------------------------------------------- the fallback's files
    def temp_dir(self) -> Path | None:
        """``tmp/`` here, for files that live only while one process uses them (a model written out for one TRT-RTX
        build); None when the cache dir is not writable (the caller then uses the system's temp dir)."""
        if not self._ensure():
            return None
        try:
            (self.root / "tmp").mkdir(exist_ok=True)
        except OSError as e:
            log.info("%s: cannot make tmp/ (%s); using the system temp dir", self.root, e.strerror or e)
            return None
        return self.root / "tmp"

    def sweep_legacy_models(self, *, min_age_s: float = 600.0) -> list[Path]:
        """Remove ``models/``: full decompressed copies of fallback models that earlier versions kept (the fallback
        now reads the bundle itself). Never raises. Entries younger than ``min_age_s`` are left to a writer of an
        earlier version that may still be filling them; a process still running a copy keeps its open file."""
        folder = self.root / "models"
        removed: list[Path] = []
        if not self._ensure():
            return removed
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return removed
        for entry in entries:
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError as e:
                log.debug("cannot remove %s: %s", entry.path, e)
        if removed:
            log.info("removed %d fallback model copies that an earlier version kept in %s", len(removed), folder)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only once empty
        return removed

    def clear(self) -> None:
        """Delete everything this shim keeps here (the next run rebuilds what it needs)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except OSError:
        return []


def clear_cache(app: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Delete what the shim keeps in ``app``'s user cache dir (the one ``load(..., app=app)`` uses); returns that dir.

    Nothing in it is needed: the next load compiles kernels again and verifies the weights afresh. Quit
    other running copies of the app first, or they may save their caches again as they exit.
    """
    cache = UserCache(app, cache_dir)
    cache.clear()
    return cache.dir


def _frame(payload: bytes, key: dict) -> bytes:
    header = json.dumps({"sha256": sha256_bytes(payload), "size": len(payload), "key": key}, sort_keys=True).encode()
    return _MAGIC + header + b"\n" + bytes(payload)


def _unframe(data: bytes, key: dict) -> tuple[bytes | None, str | None]:
    # Our own checksum: TRT-RTX would reject a torn cache too, but only after we handed it executable bytes.
    if not data.startswith(_MAGIC):
        return None, "not a runtime cache saved by this shim (bad magic)"
    end = data.find(b"\n", len(_MAGIC))
    try:
        header = json.loads(data[len(_MAGIC) : end])
        payload = data[end + 1 :]
        if end < 0 or len(payload) != header["size"]:
            return None, f"truncated: {len(payload)} bytes, header says {header.get('size')}"
        actual = sha256_bytes(payload)
        if actual != header["sha256"]:
            return None, f"checksum mismatch: expected sha256 {header['sha256']}, got {actual}"
        if header.get("key") != key:
            return None, "saved for another cache key"
    except (ValueError, KeyError, TypeError) as e:
        return None, f"unreadable header ({e})"
    return payload, None
