"""The per-user cache dir: runtime caches, engines built here, models materialized for the fallback.

Correctness comes from unique temp names plus ``os.replace`` (readers see a whole old file or a whole new one);
the locks, in their own folder, only stop two processes from doing the same work or losing each other's
newest cache. Saving is best effort: a failure is logged, never raised into the app. A file that fails its
checksum is set aside in ``corrupt/`` and ignored.

Layout (the ``v1`` folder is the layout version; a later layout gets a new folder beside it)::

    <cache dir>/CACHEDIR.TAG
    <cache dir>/trtx-v1/runtime-caches/<model id>/<key id>.rtcache
    <cache dir>/trtx-v1/engines/<name>.engine
    <cache dir>/trtx-v1/models/<weights sha256>/          (skeleton + unpacked weights, for ONNX Runtime)
    <cache dir>/trtx-v1/verified/<id>.json                  (weight files whose every frame was hashed, by file identity)
    <cache dir>/trtx-v1/locks/<name>.lock
    <cache dir>/trtx-v1/corrupt/
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .cache_key import key_id
from .errors import CacheError
from .fsutil import atomic_write, sha256_bytes
from .manifest import CacheKey

log = logging.getLogger(__name__)

ENV_VAR = "TRTX_CACHE_DIR"
LAYOUT = "trtx-v1"
_MAGIC = b"TRTX-CACHED 1\n"  # then one JSON header line (sha256, size, key), then the payload
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
        wait_log_every: float = 5.0,
    ) -> None:
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(app)
        self.root = self.dir / LAYOUT
        self.lock_timeout = lock_timeout
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
            for sub in ("runtime-caches", "engines", "models", "locks", "corrupt", "verified"):
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
        """Hold ``locks/<name>.lock``; logs "still waiting" while another process holds it; CacheError on timeout."""
        import filelock  # only the writing paths need it

        if not self._ensure():
            raise CacheError(self.problem or f"{self.dir}: not writable")
        path = self.root / "locks" / f"{name}.lock"
        timeout = self.lock_timeout if timeout is None else timeout
        lock = filelock.FileLock(str(path), thread_local=False)
        start = time.monotonic()
        while True:
            remaining = timeout - (time.monotonic() - start)
            try:
                lock.acquire(timeout=max(0.0, min(self.wait_log_every, remaining)))
                break
            except filelock.Timeout:
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise CacheError(
                        f"{path}: still locked by another process after {waited:.0f} s (timeout {timeout:.0f} s)",
                        hint="another copy of the app may be saving its cache; if none is running, delete the lock file",
                    ) from None
                log.info("still waiting for %s (held by another process, %.0f s so far)", path, waited)
        try:
            yield
        finally:
            lock.release()

    # ----------------------------------------------------------------------------------- verified weight files
    # Why a stamp may stand in for hashing: the bundle's manifest pins the weights by sha256, but nothing signs the
    # manifest, so whoever can rewrite the weight file can rewrite the manifest too; hashing on every load guards
    # against damage, not against an attacker. Damage after a full check shows up as a new file identity (size,
    # mtime, ctime or inode changes), which voids the stamp. A stamp lives where the user's runtime caches (compiled
    # kernels) live, so trusting it trusts nothing new; a forged stamp only skips checking an untouched file.
    # Left uncovered: bytes that rot on the disk without any metadata change; load(verify_weights="always") for that.
    # On Windows st_ctime is the creation time, which a rewrite in place keeps: no stamp is trusted or written there.
    def _stamp_path(self, path: Path, sha256: str, index: str) -> Path:
        key = sha256_bytes((sha256 + "\0" + index + "\0" + os.path.realpath(path)).encode())[:24]
        return self.root / "verified" / f"{key}.json"

    @staticmethod
    def _identity(path: Path, st: os.stat_result, sha256: str, index: str) -> dict:
        return {"path": os.path.realpath(path), "sha256": sha256, "index": index, "stat": _stat_key(st)}

    def is_verified(self, path: Path, sha256: str, *, index: str = "", stat: os.stat_result | None = None) -> bool:
        """True when every frame of this very file (same identity as then: pass ``stat``, the fstat of the file as
        opened, so that what is checked is what is read) was hashed and matched before, against the same frame
        table (``index``: the sha256 of the manifest that pinned it)."""
        if os.name == "nt":
            return False
        try:
            stamp = json.loads(self._stamp_path(path, sha256, index).read_text())
            return stamp == self._identity(path, stat or os.stat(path), sha256, index)
        except (OSError, ValueError):
            return False

    def mark_verified(
        self,
        path: Path,
        sha256: str,
        *,
        index: str = "",
        stat: os.stat_result | None = None,
        before: os.stat_result | None = None,
    ) -> bool:
        """Record that every frame of ``path`` was just hashed and matched; best effort. ``before``: the file's fstat
        when the hashing began; if the file changed since (``stat``, now), nothing is recorded."""
        if os.name == "nt" or not self._ensure():
            return False
        try:
            now = stat or os.stat(path)
            if before is not None and _stat_key(before) != _stat_key(now):
                log.warning("%s changed while its frames were hashed; it is checked again next time", path)
                return False
            atomic_write(
                self._stamp_path(path, sha256, index),
                json.dumps(self._identity(path, now, sha256, index), sort_keys=True).encode(),
            )
            return True
        except OSError as e:
            log.warning(
                "%s: cannot record that the weights were verified (%s); they are checked again next time",
                path,
                e.strerror or e,
            )
            return False

    # ----------------------------------------------------------------------------------- runtime caches
    def runtime_cache_path(self, model_id: str, key: CacheKey) -> Path:
        return self.root / "runtime-caches" / model_id / f"{key_id(key)}.rtcache"

    def has_runtime_cache(self, model_id: str, key: CacheKey) -> bool:
        return self.runtime_cache_path(model_id, key).is_file()

    def read_runtime_cache(self, model_id: str, key: CacheKey) -> bytes | None:
        """The cache saved for this key, or None (absent, unreadable, or corrupt: then set aside)."""
        path = self.runtime_cache_path(model_id, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("%s: cannot read the saved runtime cache (%s); compiling kernels afresh", path, e.strerror)
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
        try:
            data = path.read_bytes()
        except OSError:
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

    # ----------------------------------------------------------------------------------- materialized folders
    def materialize(self, name: str, fill: Callable[[Path], None]) -> Path:
        """``models/<name>/``, made once by ``fill(tmpdir)``: lock, check again, fill a temp dir, rename.

        Raises CacheError when the cache dir is not writable (the caller then uses a private temp dir).
        """
        final = self.root / "models" / name
        if (final / ".complete").is_file():
            return final
        with self.lock(f"models-{name}"):
            if (final / ".complete").is_file():  # another process made it while we waited
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root / "models"))
            try:
                fill(tmp)
                (tmp / ".complete").write_bytes(b"")
                if final.exists():  # a half-made folder left by a killed process (no .complete): replace it
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final

    def clear(self) -> None:
        """Delete everything this shim keeps here (the next run rebuilds what it needs)."""
        shutil.rmtree(self.root, ignore_errors=True)


def clear_cache(app: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Delete what the shim keeps in ``app``'s user cache dir (the one ``load(..., app=app)`` uses); returns that dir.

    Nothing in it is needed: the next load compiles kernels again and re-materializes the fallback model. Quit
    other running copies of the app first, or they may save their caches again as they exit.
    """
    cache = UserCache(app, cache_dir)
    cache.clear()
    return cache.dir


def _stat_key(st: os.stat_result) -> list[int]:
    """What a file's identity is made of for a verified stamp: size, mtime, ctime, inode and device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


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
