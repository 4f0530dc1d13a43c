"""Bundle integrity and the one-file form: verify every pinned file, pack to a deterministic tar, unpack safely.

The archive is a plain (uncompressed) tar: the weight store is zstd already and engines barely compress,
so compression would cost time for nothing. Entries: manifest.json first, then the pinned files in sorted
order, all with mtime 0, uid/gid 0, mode 0644, so the same bundle always packs to the same bytes.
Extraction accepts only regular files at bundle paths (manifest.json, <folder>/<sha256>.<ext>) and their
folders; anything else (absolute paths, '..', links, devices, fifos, duplicates) is refused by name
before a byte is written, and the result is verified before it appears at the target path.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runtime_shim.errors import ArchiveError, IntegrityError, ManifestError, SchemaVersionError
from runtime_shim.fsutil import CHUNK, atomic_writer, sha256_file
from runtime_shim.manifest import FILE_FOLDERS, MANIFEST_NAME, Manifest, read_manifest

_BUNDLE_FILE_RE = re.compile(r"^(?:engines|caches|weights|skeleton)/[0-9a-f]{64}\.(?:engine|cache|trtxw|onnx)$")


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One thing wrong with a bundle.

    ``kind``: schema | missing | truncated | size | changed | extra | not-a-file | engine | warning (not fatal).
    """

    kind: str
    path: str  # the file (relative to the bundle) or manifest key it is about
    message: str
    hint: str | None = None

    @property
    def fatal(self) -> bool:
        return self.kind != "warning"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "path": self.path, "message": self.message, "hint": self.hint}


# --------------------------------------------------------------------------- verify
HeaderCheck = Callable[[bytes], "tuple[str, int]"]  # TrtRuntime.engine_validity: (validity name, diagnostics bits)
# Diagnostics that say the file itself is bad; the rest (wrong SM, old driver, ...) only say it cannot run *here*.
_BAD_ENGINE_BITS = {1: "built by another TRT-RTX version", 32: "malformed engine"}


def verify_bundle(bundle_dir: str | os.PathLike[str], *, header_check: HeaderCheck | None = None) -> list[Problem]:
    """Every problem with the bundle: the schema, each pinned file's presence, size and sha256, and extra files.

    An empty list means the bundle is intact. Warnings (unknown manifest keys from a newer minor) are not fatal.
    ``header_check`` (TRT-RTX's engine validity, where a supported GPU is present) adds a look at each intact
    engine's header: a malformed engine or one from another TRT-RTX version is a problem.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        return [
            Problem(
                kind="missing",
                path=str(root),
                message="not a directory",
                hint="pass the bundle directory (or 'unpack' an archive first)",
            )
        ]
    try:
        manifest, warnings = read_manifest(root)
    except SchemaVersionError as e:
        return [Problem(kind="schema", path=MANIFEST_NAME, message=str(e), hint=e.hint)]
    except ManifestError as e:
        return [
            Problem(
                kind="schema", path=MANIFEST_NAME, message=str(e), hint=e.hint or "rebuild the bundle or fetch it again"
            )
        ]
    problems = [Problem(kind="warning", path=MANIFEST_NAME, message=w) for w in warnings]
    for key, ref in manifest.files():
        file_problems = _check_file(root, key, ref.path, ref.size, ref.sha256)
        problems += file_problems
        if header_check is not None and ref.path.startswith("engines/") and not file_problems:
            problems += _check_header(root, key, ref.path, header_check)
    for rel in unlisted_files(root, manifest):
        problems.append(
            Problem(
                kind="extra",
                path=rel,
                message="not listed in the manifest",
                hint="remove it, or rebuild the bundle; only files the manifest pins belong in a bundle",
            )
        )
    return problems


def unlisted_files(root: Path, manifest: Manifest) -> list[str]:
    """Entries under ``root`` that ``manifest`` does not pin (manifest.json itself aside), sorted; nothing is hashed."""
    pinned = {MANIFEST_NAME} | {ref.path for _, ref in manifest.files()}
    return [rel for rel in _walk(root) if rel not in pinned]


def _check_file(root: Path, key: str, rel: str, size: int, sha256: str) -> list[Problem]:
    path = root / rel
    try:
        st = path.lstat()
    except FileNotFoundError:
        return [
            Problem(kind="missing", path=rel, message=f"missing (pinned by {key})", hint="fetch or rebuild the bundle")
        ]
    if not stat.S_ISREG(st.st_mode):
        return [
            Problem(
                kind="not-a-file", path=rel, message=f"not a regular file (pinned by {key}); links are not followed"
            )
        ]
    if st.st_size < size:
        return [
            Problem(
                kind="truncated",
                path=rel,
                message=f"truncated: {st.st_size} bytes, expected {size} ({key}.size)",
                hint="the copy or download was cut short; fetch the bundle again",
            )
        ]
    if st.st_size > size:
        return [
            Problem(
                kind="size",
                path=rel,
                message=f"{st.st_size} bytes, expected {size} ({key}.size)",
                hint="the file was changed after the bundle was built; rebuild or fetch it again",
            )
        ]
    actual, _size = sha256_file(path)
    if actual != sha256:
        return [
            Problem(
                kind="changed",
                path=rel,
                message=f"sha256 {actual}, expected {sha256} ({key}.sha256): content changed",
                hint="the file was altered; rebuild or fetch the bundle again",
            )
        ]
    return []


def _check_header(root: Path, key: str, rel: str, header_check: HeaderCheck) -> list[Problem]:
    with open(root / rel, "rb") as f:
        header = f.read(64)  # Runtime.engine_header_size in TRT-RTX 1.7
    validity, bits = header_check(header)
    bad = [text for bit, text in _BAD_ENGINE_BITS.items() if bits & bit]
    if not bad:
        return []
    return [
        Problem(
            kind="engine",
            path=rel,
            message=f"TRT-RTX says the engine is {validity} ({', '.join(bad)}; {key})",
            hint="rebuild the bundle with the TRT-RTX version in manifest.json trt_rtx.version",
        )
    ]


def _walk(root: Path) -> list[str]:
    """Every non-directory entry under root (links included, never followed), as sorted posix paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        # A link to a directory shows up in dirnames; report it like any other stray entry.
        for name in list(dirnames):
            if (Path(dirpath) / name).is_symlink():
                out.append((rel_dir / name).as_posix())
        out += [(rel_dir / n).as_posix() for n in filenames]
    return sorted(out)


def raise_for_problems(problems: list[Problem], *, what: str) -> None:
    fatal = [p for p in problems if p.fatal]
    if fatal:
        shown = "\n  ".join(str(p) for p in fatal[:10])
        more = f"\n  ... and {len(fatal) - 10} more" if len(fatal) > 10 else ""
        raise IntegrityError(
            f"{what}: {len(fatal)} problem(s):\n  {shown}{more}", hint=next((p.hint for p in fatal if p.hint), None)
        )


def temp_sibling(path: Path, tag: str) -> Path:
    """A new, unique, hidden directory beside ``path``. Plain mkdir, not mkdtemp: mkdtemp's mode 0700 would stick to
    the bundle once the directory is renamed into place, while mkdir gives the user's usual mode (umask)."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: cannot create a unique temp directory")  # pragma: no cover


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
    manifest, _ = read_manifest(root)
    names = [MANIFEST_NAME] + sorted({ref.path for _, ref in manifest.files()})
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
    return PackResult(path=out, size=out.stat().st_size, files=len(names), left_out=extras)


# --------------------------------------------------------------------------- unpack
def unpack_bundle(archive: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Manifest:
    """Extract a bundle archive into ``out_dir`` (new or empty), safely, and verify it. Returns its manifest.

    Extraction goes to a temp sibling directory that is renamed into place only once verified, so a refused
    or corrupt archive leaves nothing at ``out_dir`` and nothing anywhere else.
    """
    src, target = Path(archive), Path(os.path.abspath(out_dir))
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ArchiveError(
            f"{target}: exists and is not an empty directory; unpack refuses to mix files into it",
            hint="choose a new directory, or remove that one yourself",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target, "unpack")
    try:
        _extract(src, tmp)
        raise_for_problems(verify_bundle(tmp), what=f"{src}: the unpacked bundle")
        manifest, _ = read_manifest(tmp)
        if target.exists():
            # Empty (checked above). Move the entries in rather than replace the directory: its inode, owner and
            # mode stay, and so does a shell sitting in it.
            for entry in sorted(tmp.iterdir()):
                os.rename(entry, target / entry.name)
        else:
            os.rename(tmp, target)
            tmp = None
        return manifest
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _extract(src: Path, dest: Path) -> None:
    try:
        tar = tarfile.open(src, mode="r:")  # uncompressed only: what pack writes
    except FileNotFoundError:
        raise ArchiveError(f"{src}: not found") from None
    except (tarfile.TarError, OSError) as e:
        raise ArchiveError(
            f"{src}: not a bundle archive (an uncompressed tar made by 'trtx-bundle pack'): {e}"
        ) from None
    seen: set[str] = set()
    with tar:
        try:
            for member in tar:
                name = _check_member(src, member, seen)
                if member.isdir():
                    continue
                path = dest / name
                path.parent.mkdir(parents=True, exist_ok=True)
                reader = tar.extractfile(member)
                assert reader is not None  # a regular file always has data
                # O_EXCL: never open something that is already there (a link planted by an earlier entry, say).
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(reader, out, CHUNK)
        except tarfile.TarError as e:
            raise ArchiveError(f"{src}: corrupt or truncated archive ({e})", hint="fetch the archive again") from None


def _check_member(src: Path, member: tarfile.TarInfo, seen: set[str]) -> str:
    raw = member.name
    kind = _member_kind(member)
    if kind is not None:
        raise ArchiveError(
            f"{src}: entry {raw!r} is a {kind}; a bundle archive holds only regular files and folders",
            hint="the archive was not made by 'trtx-bundle pack', or it was tampered with: do not use it",
        )
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or PurePosixPath(raw).is_absolute():
        raise ArchiveError(
            f"{src}: entry {raw!r} has an absolute path; refused",
            hint="the archive was not made by 'trtx-bundle pack', or it was tampered with: do not use it",
        )
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            f"{src}: entry {raw!r} climbs out of the bundle with '..'; refused",
            hint="the archive was not made by 'trtx-bundle pack', or it was tampered with: do not use it",
        )
    name = "/".join(parts)
    if member.isdir():
        if name not in FILE_FOLDERS:
            raise ArchiveError(
                f"{src}: entry {raw!r} is a folder a bundle does not have (expected one of {', '.join(FILE_FOLDERS)})"
            )
        return name
    if name != MANIFEST_NAME and not _BUNDLE_FILE_RE.match(name):
        raise ArchiveError(
            f"{src}: entry {raw!r} is not a bundle file (expected manifest.json or <folder>/<sha256>.<ext>)",
            hint="the archive was not made by 'trtx-bundle pack'",
        )
    if name in seen:
        raise ArchiveError(
            f"{src}: entry {raw!r} appears twice; refused (the second copy could replace a verified file)"
        )
    seen.add(name)
    return name


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """What a member is, when it is not a regular file or a folder."""
    if member.isreg() or member.isdir():
        return None
    if member.issym():
        return f"symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "fifo"
    return f"special entry (tar type {member.type!r})"


# --------------------------------------------------------------------------- inspect
def describe_bundle(bundle_dir: str | os.PathLike[str]) -> dict:
    """A summary of the bundle for `inspect`: model, I/O, profiles, weights (raw vs stored), engines, caches."""
    from .coverage import coverage

    root = Path(bundle_dir)
    manifest, warnings = read_manifest(root)
    w = manifest.weights
    raw = sum(b.nbytes for b in w.blobs)
    tensor_bytes = sum(w.blobs[t.blob].nbytes for t in w.tensors)  # before identical tensors were merged
    encodings: dict[str, int] = {}
    for b in w.blobs:
        encodings[b.encoding] = encodings.get(b.encoding, 0) + 1
    return {
        "bundle": str(root),
        "schema_version": manifest.schema_version,
        "model": manifest.model.to_dict(),
        "trt_rtx": manifest.trt_rtx.to_dict(),
        "inputs": [t.to_dict() for t in manifest.inputs],
        "outputs": [t.to_dict() for t in manifest.outputs],
        "profiles": [p.to_dict() for p in manifest.profiles],
        "warmup_shapes": [{k: list(v) for k, v in s.items()} for s in manifest.warmup_shapes],
        "weights": {
            "file": w.file.path,
            "tensors": len(w.tensors),
            "blobs": len(w.blobs),
            "tensor_bytes": tensor_bytes,
            "raw_bytes": raw,
            "stored_bytes": w.file.size,
            "ratio": round(raw / w.file.size, 3) if w.file.size else None,
            "encodings": dict(sorted(encodings.items())),
        },
        "skeleton": manifest.skeleton.to_dict(),
        "engines": [e.to_dict() for e in manifest.engines],
        "runtime_caches": [c.to_dict() for c in manifest.runtime_caches],
        "coverage": coverage(manifest).to_dict(),  # per platform x SM: engine a user gets, GPUs with a cache
        "creator": manifest.creator.to_dict(),
        "warnings": warnings,
    }
