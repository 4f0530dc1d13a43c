"""Bundle archives (.trtx, what `trtx-bundle pack` writes) read safely: in place, or unpacked once, every file checked.

The archive is a plain tar: manifest.json first, then its signature manifest.sig where the bundle is signed,
then the pinned files. Reading takes manifest.json first (capped in size) and from then on the manifest's word
over the archive's: every later entry must be a plain regular file (no sparse file, link, device or fifo) at a
path the manifest pins, declaring exactly the pinned size, and appear once; its sha256 is checked as it is read.
The one entry the manifest does not pin, manifest.sig, may only come right after it, capped at 1 MiB; whether
it signs the manifest is signing.py's to check, where keys are trusted. So a hostile archive can make an unpack write at
most the manifest's own total, and is refused by name at the first entry that breaks a rule.

- ``read_archive_bundle``: the whole manifest (every model), read in place (inspect);
  ``read_archive_manifest`` one model's view of it (doctor, run).
- ``read_archive_signature``: manifest.json's and manifest.sig's bytes, read in place (verify --key).
- ``check_archive``: every entry streamed and hashed in place, nothing written (verify).
- ``extract_archive``: into a new or empty directory, via a temp directory beside it, renamed into place only
  when every pinned file arrived intact (bundler's unpack).
- ``unpack_cached``: once into a cache directory keyed by the manifest's sha256, then reused (load, run); one copy
  serves every model of the bundle.
Every file the manifest pins is one entry, whichever models share it (``BundleManifest.files``).
What each tar entry may be is archive_members.py's. The bundler's pack and unpack (bundler/archive.py) are built on
this module; the runtime never imports the bundler.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .archive_members import NOT_PACKED, check_member, open_tar, refuse
from .errors import ArchiveError, BundleError, IntegrityError, ManifestError
from .fsutil import (
    CHUNK,
    atomic_writer,
    disk_errors,
    open_regular_file,
    os_error_hint,
    owned_temp_dir,
    require_free_space,
    sweep_stale_temp_dirs,
)
from .manifest import FILE_FOLDERS, MANIFEST_NAME, BundleManifest, FileRef, Manifest
from .signing import MAX_SIGNATURE_BYTES, SIGNATURE_NAME

# manifest.json is read into memory before anything else; no real one comes near this.
_MAX_MANIFEST_BYTES = 64 << 20
ARCHIVE_KIND = "a bundle archive made by 'trtx-bundle pack'"


@dataclass(frozen=True, kw_only=True)
class FileProblem:
    """One pinned file that did not arrive intact (the bundler renders it as a verify Problem)."""

    kind: str  # changed | missing
    path: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def raise_file_problems(problems: list[FileProblem], *, what: str) -> None:
    """IntegrityError listing the problems as bundle verification words them (bundle_io.raise_for_problems)."""
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise IntegrityError(
            f"{what}: {len(problems)} problem(s):\n  {shown}{more}",
            hint=next((p.hint for p in problems if p.hint), None),
        )


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a file (an archive) rather than a bundle directory."""
    return Path(path).is_file()


@contextmanager
def open_archive(archive: str | os.PathLike[str]) -> Iterator[tarfile.TarFile]:
    """The archive as a strict tarfile (see the module docstring); ArchiveError naming it otherwise."""
    src = Path(archive)
    try:
        f, _size = open_regular_file(src, ARCHIVE_KIND, error=ArchiveError)
    except FileNotFoundError:
        raise ArchiveError(f"{src}: not found") from None
    with f, open_tar(src, f) as tar:
        yield tar


def read_archive_bundle(archive: str | os.PathLike[str]) -> tuple[BundleManifest, list[str], bytes]:
    """(the whole manifest, warnings, its bytes) read in place from the archive's first entry; no file is written."""
    bundle, warnings, raw, _signature = _read_head(Path(archive), signature=False)
    return bundle, warnings, raw


def read_archive_manifest(
    archive: str | os.PathLike[str], model: str | None = None
) -> tuple[Manifest, list[str], bytes]:
    """(one model's view, warnings, the manifest's bytes) read in place; ``model`` may be left out for one model."""
    bundle, warnings, raw = read_archive_bundle(archive)
    return bundle.view(model, source=f"{archive}: {MANIFEST_NAME}"), warnings, raw


def read_archive_signature(archive: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """(manifest.json's bytes, manifest.sig's bytes or None where the archive carries none), read in place."""
    _bundle, _warnings, raw, signature = _read_head(Path(archive), signature=True)
    return raw, signature


def _read_head(src: Path, *, signature: bool) -> tuple[BundleManifest, list[str], bytes, bytes | None]:
    """The manifest (parsed once), its warnings, its bytes, and with ``signature`` the signature's bytes where one
    follows it (without, nothing after the manifest is read: inspect reads the manifest alone)."""
    with open_archive(src) as tar:
        bundle, raw, warnings = _read_manifest_entry(src, tar)
        return bundle, warnings, raw, _read_signature_entry(src, tar) if signature else None


def check_archive(archive: str | os.PathLike[str]) -> BundleManifest:
    """Every entry checked by the unpack rules and hashed, in place (nothing written); raises on the first problem."""
    src = Path(archive)
    with open_archive(src) as tar:
        manifest, _raw, _warnings = _read_manifest_entry(src, tar)
        _stream_pinned(src, tar, _pins(manifest), lambda name: None)
    return manifest


def extract_archive(archive: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> BundleManifest:
    """Extract a bundle archive into ``out_dir`` (new or empty), safely, every pinned file of every model checked.

    Every rule of the module docstring is checked before the bytes it guards are written; a refused or
    damaged archive leaves nothing at ``out_dir`` and nothing anywhere else.
    """
    src, target = Path(archive), Path(os.path.abspath(out_dir))
    with disk_errors(target, "cannot look at the target", "nothing was written"):
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ArchiveError(
                f"{target}: exists and is not an empty directory; unpack refuses to mix files into it",
                hint="choose a new directory, or remove that one yourself",
            )
    with open_archive(src) as tar:
        manifest, raw, _warnings = _read_manifest_entry(src, tar)
        pinned = _pins(manifest)
        with disk_errors(target, f"cannot unpack {src} here", "nothing was written"):
            target.parent.mkdir(parents=True, exist_ok=True)
            need = len(raw) + sum(ref.size for _key, ref in pinned.values())
            require_free_space(
                target.parent,
                need,
                needs=f"the bundle needs {need}; nothing was written",
                hint="free some space or unpack on another disk",
            )
            prefix = f".{target.name}.unpack-"
            sweep_stale_temp_dirs(target.parent, prefix)
            with owned_temp_dir(target.parent, prefix) as tmp:
                _extract_pinned(src, tar, tmp, pinned)
                with atomic_writer(tmp / MANIFEST_NAME) as out:
                    out.write(raw)
                _move_into_place(tmp, target)
    return manifest


def unpack_cached(archive: str | os.PathLike[str], cache_root: str | os.PathLike[str]) -> Path:
    """The archive's bundle directory under ``cache_root``, unpacked (and checked) on first use, then reused.

    Keyed by the sha256 of the archive's manifest.json, which pins every other file by sha256: an archive with
    other content gets another directory. A reused directory is the one an earlier call unpacked and checked;
    load() hashes its engines and caches again on every use, its weights as ``verify_weights`` says.
    """
    src = Path(archive)
    bundle, _warnings, raw, signature = _read_head(src, signature=True)
    sha = hashlib.sha256(raw).hexdigest()
    # A signed archive gets its own copy: another archive of the same manifest may carry another signature, or none.
    signed = f"-{hashlib.sha256(signature).hexdigest()[:8]}" if signature is not None else ""
    # One copy for the whole bundle: every model of it loads from there (named after its first model, for people).
    name = bundle.names[0][:40] + (f"+{len(bundle.names) - 1}" if len(bundle.names) > 1 else "")
    target = Path(cache_root) / f"{name}-{sha[:32]}{signed}".replace(os.sep, "_")
    existing = target / MANIFEST_NAME

    def same_copy() -> bool:
        try:
            if not (existing.is_file() and existing.read_bytes() == raw):
                return False
            sig = target / SIGNATURE_NAME
            return (sig.read_bytes() if sig.is_file() else None) == signature
        except OSError:
            return False

    if same_copy():
        return target
    if target.exists():
        # Copies arrive whole (one rename below), so this one was changed after it arrived: set it aside (one atomic
        # rename, so a concurrent load of the same archive cannot lose a good copy to it) and unpack again.
        aside = target.with_name(f".{target.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
    parent = target.parent
    with disk_errors(parent, "cannot make the user cache's bundle folder", "nothing was written"):
        parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.unpack-"
    sweep_stale_temp_dirs(parent, prefix)
    with owned_temp_dir(parent, prefix) as tmp:
        extract_archive(src, tmp / "bundle")
        try:
            os.rename(tmp / "bundle", target)  # whole, at once: readers never see a partial copy
        except OSError as e:
            # Another process unpacked the same archive at the same moment and its rename won: its copy is as good.
            if same_copy():
                return target
            raise BundleError(
                f"{target}: cannot put the unpacked bundle in place ({e.strerror or e})", hint=os_error_hint(e)
            ) from None
    return target


def unpack_for(archive: str | os.PathLike[str], user_cache: Any) -> Path:
    """``unpack_cached`` into the user cache's ``bundles`` folder (a runtime_shim.user_cache.UserCache)."""
    if not user_cache.writable:
        raise BundleError(
            f"{archive}: a bundle archive, and the user cache cannot hold its unpacked copy ({user_cache.problem})",
            hint="unpack it yourself (trtx-bundle unpack FILE -o DIR) and load the directory, or pass another cache_dir",
        )
    return unpack_cached(archive, Path(user_cache.root) / "bundles")


def _read_manifest_entry(src: Path, tar: tarfile.TarFile) -> tuple[BundleManifest, bytes, list[str]]:
    """manifest.json, which pack writes first; only the bundle's folders may come before it."""
    seen: set[str] = set()
    for _ in range(len(FILE_FOLDERS) + 1):
        try:
            member = tar.next()
        except OSError as e:
            # Python 3.10's tarfile seeks to offset -1 when an archive has no member at all: EINVAL, not None.
            if e.errno != errno.EINVAL or tar.offset != 0:
                raise
            member = None
        if member is None:
            break
        name = check_member(src, member, seen)
        if member.isdir():
            continue
        if name != MANIFEST_NAME:
            raise ArchiveError(
                f"{src}: entry {member.name!r} comes before manifest.json; expected manifest.json as the first file",
                hint=NOT_PACKED,
            )
        if member.size > _MAX_MANIFEST_BYTES:
            refuse(src, member.name, f"a manifest of {member.size} bytes (at most {_MAX_MANIFEST_BYTES})")
        reader = tar.extractfile(member)
        assert reader is not None  # a regular member always has data
        raw = reader.read(member.size)
        if len(raw) != member.size:
            raise ArchiveError(f"{src}: truncated inside manifest.json", hint="fetch the archive again")
        try:
            manifest, warnings = BundleManifest.from_json(raw, source=f"{src}: {MANIFEST_NAME}")
        except ManifestError as e:
            raise ArchiveError(str(e), hint=e.hint or "fetch the archive again") from None
        return manifest, raw, warnings
    raise ArchiveError(f"{src}: no manifest.json at the start of the archive", hint=NOT_PACKED)


def _read_signature_entry(src: Path, tar: tarfile.TarFile) -> bytes | None:
    """manifest.sig's bytes where it is the next entry (pack writes it right after manifest.json), else None."""
    member = tar.next()
    if member is None or member.isdir():
        return None
    name = check_member(src, member, {MANIFEST_NAME})
    return _signature_bytes(src, tar, member, first=True) if name == SIGNATURE_NAME else None


def _signature_bytes(src: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, *, first: bool) -> bytes:
    if not first:
        refuse(src, member.name, "a signature that does not come right after manifest.json")
    if member.size > MAX_SIGNATURE_BYTES:
        refuse(src, member.name, f"a signature of {member.size} bytes (at most {MAX_SIGNATURE_BYTES})")
    reader = tar.extractfile(member)
    assert reader is not None  # a regular member always has data
    data = reader.read(member.size)
    if len(data) != member.size:
        raise ArchiveError(f"{src}: truncated inside {SIGNATURE_NAME}", hint="fetch the archive again")
    return data


def _pins(manifest: BundleManifest) -> dict[str, tuple[str, FileRef]]:
    """Bundle path -> (key path, file ref) for every file the manifest pins, of every model (once each: the parse
    refused a manifest that pins one path two ways)."""
    return {ref.path: (key, ref) for key, ref in manifest.files()}


def _extract_pinned(src: Path, tar: tarfile.TarFile, dest: Path, pinned: dict[str, tuple[str, FileRef]]) -> None:
    def sink(name: str) -> IO[bytes]:
        path = dest / name
        path.parent.mkdir(exist_ok=True)
        # O_EXCL: never open something that is already there (a link planted by an earlier entry, say).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        return os.fdopen(fd, "wb")

    _stream_pinned(src, tar, pinned, sink)


def _stream_pinned(
    src: Path,
    tar: tarfile.TarFile,
    pinned: dict[str, tuple[str, FileRef]],
    sink: Callable[[str], IO[bytes] | None],
) -> None:
    """Every entry after the manifest, checked against the pins and hashed; ``sink(name)`` receives its bytes."""
    seen = {MANIFEST_NAME}
    first = True
    while (member := tar.next()) is not None:
        name = check_member(src, member, seen)
        if member.isdir():
            continue
        if name == SIGNATURE_NAME:
            signature = _signature_bytes(src, tar, member, first=first)
            out = sink(name)
            if out is not None:
                with out:
                    out.write(signature)
            first = False
            continue
        first = False
        if name not in pinned:
            refuse(src, member.name, "a file that manifest.json does not pin")
        key, ref = pinned[name]
        if member.size != ref.size:
            refuse(src, member.name, f"{member.size} bytes, but manifest.json pins {ref.size} ({key}.size)")
        reader = tar.extractfile(member)
        assert reader is not None
        h = hashlib.sha256()
        out = sink(name)
        try:
            while chunk := reader.read(CHUNK):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
        if h.hexdigest() != ref.sha256:
            problem = FileProblem(
                kind="changed",
                path=name,
                message=f"sha256 {h.hexdigest()}, expected {ref.sha256} ({key}.sha256): content changed",
                hint="the archive is damaged or was tampered with; fetch it again",
            )
            raise_file_problems([problem], what=f"{src}: the unpacked bundle")
    missing = [
        FileProblem(
            kind="missing", path=rel, message=f"not in the archive (pinned by {key})", hint="fetch the archive again"
        )
        for rel, (key, _ref) in sorted(pinned.items())
        if rel not in seen
    ]
    raise_file_problems(missing, what=f"{src}: the unpacked bundle")


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    # Empty (checked before). Move the entries in rather than replace the directory: its inode, owner and
    # mode stay, and so does a shell sitting in it. On a failure the entries go back, so it stays empty.
    moved: list[str] = []
    try:
        for entry in sorted(tmp.iterdir()):
            os.rename(entry, target / entry.name)
            moved.append(entry.name)
    except BaseException:
        for name in moved:
            os.rename(target / name, tmp / name)
        raise
