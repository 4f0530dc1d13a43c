"""The output directory of a build: refuse what cannot be written into, then move a finished bundle into place.

Rule: a missing or empty directory is filled; a non-empty one is refused unless ``force``. With ``force`` only the
bundle's own files are replaced: manifest.json, the new content files, and the old content files that the old
manifest listed. Any other file there is left alone (and reported).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from runtime_shim.errors import BundleError, ManifestError
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest, read_bundle_manifest
from runtime_shim.signing import SIGNATURE_NAME

from .bundle_io import unlisted_files


class OutputDirError(BundleError):
    """The output directory cannot be used as asked (not empty without --force, not a directory, ...)."""


def check_output_dir(out: Path, *, force: bool) -> None:
    if out.is_symlink():
        raise OutputDirError(
            f"{out}: is a symbolic link; a bundle is written only into a real directory",
            hint="pass the link's target, or choose another output path",
        )
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a directory", hint="choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputDirError(
            f"{out}: exists and is not empty; refusing to write a bundle into it",
            hint="choose a new directory, or pass --force to replace the bundle's own files there "
            "(other files are never deleted)",
        )


def move_into_place(tmp: Path, out: Path, new_manifest: BundleManifest) -> tuple[list[str], bool]:
    """Put the finished bundle at ``out``; returns the files found there that are not the bundle's (left alone), and
    whether a signature (manifest.sig) over the old manifest was removed because the new manifest differs."""
    if not out.exists():
        os.rename(tmp, out)
        return [], False
    # An existing directory is kept (its inode, owner and mode, and any shell sitting in it): files move in.
    old_files: set[str] = set()
    with contextlib.suppress(ManifestError, OSError):
        old_manifest, _, _ = read_bundle_manifest(out)
        old_files = {ref.path for _, ref in old_manifest.files()}
    new_files = {ref.path for _, ref in new_manifest.files()}
    # Content files first (a name is its content, so replacing one is harmless), then the manifest: the
    # commit point. A crash in between leaves the old manifest, still pointing at files that are there.
    for rel in sorted(new_files):
        dest = out / rel
        if dest.parent.exists() and not dest.parent.is_dir():
            raise OutputDirError(
                f"{dest.parent}: is a file where the bundle needs a folder; not touched",
                hint="move that file away, or build into a new directory",
            )
        dest.parent.mkdir(exist_ok=True)
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise OutputDirError(
                f"{dest}: exists and is not a regular file; not touched",
                hint="move it away, or build into a new directory",
            )
        os.replace(tmp / rel, dest)
    # A signature signs the old manifest's bytes: beside a different manifest it would only ever fail to verify.
    # It moves aside first and comes back if the commit fails, so no stale signature ever sits by a new manifest.
    sig, aside = out / SIGNATURE_NAME, tmp / f".old-{SIGNATURE_NAME}"
    stale = sig.is_file() and not sig.is_symlink() and _bytes_or_none(out / MANIFEST_NAME) != new_manifest.to_json()
    if stale:
        os.replace(sig, aside)
    try:
        os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)
    except BaseException:
        if stale:
            os.replace(aside, sig)
        raise
    for rel in sorted(old_files - new_files):
        with contextlib.suppress(FileNotFoundError):
            (out / rel).unlink()
    shutil.rmtree(tmp, ignore_errors=True)  # only empty folders remain in it by now
    for folder in ("engines", "caches", "weights", "skeleton"):
        with contextlib.suppress(OSError):
            (out / folder).rmdir()  # only if empty
    # tmp was verified before it moved: only files that are not the bundle's are left to report (no second hashing pass).
    return [f for f in unlisted_files(out, new_manifest) if f != SIGNATURE_NAME], stale


def _bytes_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
