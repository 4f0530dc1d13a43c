"""What a bundle archive's tar entries may be: the member rules and the strict header reader that archive.py applies.

Only bundle folders and bundle files (manifest.json, its signature manifest.sig, <folder>/<sha256>.<ext>), each
once, as plain regular files; sparse members and oversized extended headers are refused inside tarfile's header
parsing, before tarfile acts on what they declare. Every refusal is an ArchiveError naming the archive and the entry.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

from .errors import ArchiveError
from .manifest import FILE_FOLDERS, MANIFEST_NAME
from .signing import SIGNATURE_NAME

# pax and GNU long-name records hold a path and a few numbers; tarfile would read any declared size into memory.
_MAX_HEADER_BYTES = 1 << 20
NOT_PACKED = "the archive was not made by 'trtx-bundle pack', or it was tampered with: do not use it"
_NOT_PACKED = NOT_PACKED


@contextmanager
def open_tar(src: Path, f: Any) -> Iterator[tarfile.TarFile]:
    """The archive as a tarfile that refuses sparse members and oversized headers; tar errors become ArchiveError."""
    try:
        tar = tarfile.open(fileobj=f, mode="r:", tarinfo=_StrictTarInfo)  # uncompressed only: what pack writes
    except _Refused as e:
        refuse(src, e.name, e.what)
    except (tarfile.TarError, ValueError, OverflowError, EOFError) as e:
        raise ArchiveError(
            f"{src}: not a bundle archive (an uncompressed tar made by 'trtx-bundle pack'): {e}"
        ) from None
    with tar:
        try:
            yield tar
        except _Refused as e:
            refuse(src, e.name, e.what)
        except (tarfile.TarError, ValueError, OverflowError, EOFError) as e:
            # tarfile raises ValueError and kin too on some malformed headers (a sparse map cut short, say).
            raise ArchiveError(f"{src}: corrupt or truncated archive ({e})", hint="fetch the archive again") from None


_BUNDLE_FILE_RE = re.compile(r"^(?:engines|caches|weights|skeleton)/[0-9a-f]{64}\.(?:engine|cache|trtxw|onnx)$")


class _Refused(tarfile.TarError):
    """Raised from inside tarfile's header parsing, before it acts on what the header declares."""

    def __init__(self, name: str, what: str) -> None:
        super().__init__(f"{name!r} is {what}")
        self.name, self.what = name, what


def _refuse_sparse(next_member: tarfile.TarInfo, pax_headers: dict[str, str], *_args: object) -> NoReturn:
    raise _Refused(pax_headers.get("GNU.sparse.name", next_member.name), "a sparse file")


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header reader, minus what a bundle archive never holds: sparse members and oversized headers."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(self.name, "a sparse file")
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME)
        if self.type in (*extended, tarfile.GNUTYPE_LONGLINK) and self.size > _MAX_HEADER_BYTES:
            raise _Refused(self.name, f"an extended header of {self.size} bytes (at most {_MAX_HEADER_BYTES})")
        return super()._proc_member(tarfile_)  # type: ignore[misc]  # private in typeshed; stable since Python 3.2

    # GNU sparse formats 0.0, 0.1, 1.0 in pax headers: refused before tarfile reads a sparse map.
    def _proc_gnusparse_00(self, next_member: Any, pax_headers: Any, *args: Any) -> NoReturn:
        _refuse_sparse(next_member, pax_headers)

    def _proc_gnusparse_01(self, next_member: Any, pax_headers: Any, *args: Any) -> NoReturn:
        _refuse_sparse(next_member, pax_headers)

    def _proc_gnusparse_10(self, next_member: Any, pax_headers: Any, *args: Any) -> NoReturn:
        _refuse_sparse(next_member, pax_headers)


def refuse(src: Path, raw: str, what: str) -> NoReturn:
    raise ArchiveError(f"{src}: entry {raw!r} is {what}; refused before writing it", hint=_NOT_PACKED)


def check_member(src: Path, member: tarfile.TarInfo, seen: set[str]) -> str:
    """The member's bundle path, or ArchiveError: only bundle folders and bundle files, each once, pass."""
    raw = member.name
    kind = _member_kind(member)
    if kind is not None:
        raise ArchiveError(
            f"{src}: entry {raw!r} is a {kind}; a bundle archive holds only regular files and folders",
            hint=_NOT_PACKED,
        )
    if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or PurePosixPath(raw).is_absolute():
        raise ArchiveError(f"{src}: entry {raw!r} has an absolute path; refused", hint=_NOT_PACKED)
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{src}: entry {raw!r} climbs out of the bundle with '..'; refused", hint=_NOT_PACKED)
    name = "/".join(parts)
    if member.isdir():
        if name not in FILE_FOLDERS:
            raise ArchiveError(
                f"{src}: entry {raw!r} is a folder a bundle does not have (expected one of {', '.join(FILE_FOLDERS)})",
                hint=_NOT_PACKED,
            )
    elif name not in (MANIFEST_NAME, SIGNATURE_NAME) and not _BUNDLE_FILE_RE.match(name):
        raise ArchiveError(
            f"{src}: entry {raw!r} is not a bundle file (expected manifest.json, manifest.sig or <folder>/<sha256>.<ext>)",
            hint=_NOT_PACKED,
        )
    if name in seen:
        raise ArchiveError(
            f"{src}: entry {raw!r} appears twice; refused (the second copy could replace a verified file)",
            hint=_NOT_PACKED,
        )
    seen.add(name)
    return name


def _member_kind(member: tarfile.TarInfo) -> str | None:
    """What a member is, when it is not a plain regular file or a folder."""
    if member.sparse is not None or any(k.startswith("GNU.sparse.") for k in member.pax_headers):
        return "sparse file"
    if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) or member.isdir():
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
