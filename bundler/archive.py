"""The one-file form of a bundle: pack to a deterministic tar; unpack only what its manifest pins, checked first.

The archive is a plain (uncompressed) tar: the weight store is zstd already and engines barely compress,
so compression would cost time for nothing. Entries: manifest.json first, then its signature manifest.sig
where there is one, then the pinned files in sorted order, all with mtime 0, uid/gid 0, mode 0644, so the
same bundle always packs to the same bytes.

Reading an archive (its rules against hostile archives, the in-place reads, the safe extraction) lives in
runtime_shim.archive, which the runtime uses too (load() of a .trtx); unpack_bundle is its extraction.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from runtime_shim.archive import extract_archive
from runtime_shim.errors import ArchiveError
from runtime_shim.fsutil import atomic_writer, disk_errors
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest, read_bundle_manifest
from runtime_shim.signing import SIGNATURE_NAME, read_signature

from .bundle_io import raise_for_problems, verify_bundle

_BAD_DISK = "nothing was written (an archive already there is left as it was)"


# --------------------------------------------------------------------------- pack
@dataclass(frozen=True, kw_only=True)
class PackResult:
    path: Path
    size: int
    files: int
    left_out: tuple[str, ...]  # extra files in the directory that the archive does not carry


def pack_bundle(bundle_dir: str | os.PathLike[str], out_file: str | os.PathLike[str]) -> PackResult:
    """Write the bundle as one deterministic tar (see the module docstring); refuses a bundle that fails verify."""
    root = Path(bundle_dir)
    out = Path(out_file)
    problems = verify_bundle(root)
    extras = tuple(p.path for p in problems if p.kind == "extra")
    raise_for_problems([p for p in problems if p.kind != "extra"], what=f"{root}: cannot pack")
    if out.resolve().is_relative_to(root.resolve()):
        raise ArchiveError(
            f"{out}: the archive cannot be written inside the bundle it packs ({root})",
            hint="choose an output path outside the bundle directory",
        )
    bundle, _warnings, _sha = read_bundle_manifest(root)
    signature = read_signature(root)  # travels right after the manifest it signs; a regular file, capped
    names = [MANIFEST_NAME] + sorted({ref.path for _, ref in bundle.files()})  # every model's, a shared file once
    with disk_errors(out, "cannot write the archive", _BAD_DISK):
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(out) as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in names:
                    path = root / name
                    info = tarfile.TarInfo(name)
                    info.size = path.stat().st_size
                    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
                    with open(path, "rb") as src:
                        tar.addfile(info, src)
                    if name == MANIFEST_NAME and signature is not None:
                        sig = tarfile.TarInfo(SIGNATURE_NAME)
                        sig.size, sig.mtime, sig.mode, sig.uname, sig.gname = len(signature), 0, 0o644, "", ""
                        tar.addfile(sig, io.BytesIO(signature))
        size = out.stat().st_size
    return PackResult(path=out, size=size, files=len(names) + (signature is not None), left_out=extras)


# --------------------------------------------------------------------------- unpack
def unpack_bundle(archive: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> BundleManifest:
    """Extract a bundle archive into ``out_dir`` (new or empty), safely, every model's files verified. Returns its
    manifest.

    Every rule of runtime_shim.archive is checked before the bytes it guards are written; a refused or
    damaged archive leaves nothing at ``out_dir`` and nothing anywhere else.
    """
    return extract_archive(archive, out_dir)
