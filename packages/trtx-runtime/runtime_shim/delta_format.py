"""The update file (.trtxd, docs/DELTA.md): its layout and header records, and a reader that checks both before use.

Layout: an 8-byte start magic, the sections back to back (NEW's manifest.json, its manifest.sig where signed, the
whole files OLD lacks, the literal weight bytes), the header (canonical JSON), then a 16-byte trailer: the header's
length (u64 LE) and an end magic. The header comes last so that the writer streams every section once, compressing
as it goes, and still knows their sizes; a truncated file has no trailer and is refused by that alone. Every byte is
accounted for: the start magic, the sections the header lists, the header and the trailer add up to the file's size.

``read_delta`` checks the trailer, the header (its records, its layout, sizes against caps) and returns offsets;
``DeltaFile.reader`` streams one section's bytes, decoded, never more than the size the caller expects.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO, ClassVar

from .bundle_files import FileRef
from .errors import DeltaError, ManifestError
from .fsutil import CHUNK, open_regular_file
from .schema import Count, Key, Record, Sha256, at, canonical_json, kind_name, one_of, parse_json
from .store.digest import digest_function

DELTA_KIND = "trtx-bundle-delta"
DELTA_SCHEMA_VERSION = 1
START_MAGIC = b"TRTXD\x00\x01\x00"  # "TRTXD", NUL, layout version 1, reserved
END_MAGIC = b"TRTXDEND"
TRAILER = struct.Struct("<Q8s")  # header length, END_MAGIC
MAX_HEADER_BYTES = 64 << 20  # a recipe op is ~60 bytes: a million of them, for a weight file of a million frames
MAX_MANIFEST_BYTES = 64 << 20  # the archive reader's cap
LITERALS = "weights.literals"  # the section of weight bytes OLD lacks, in recipe order
SECTION_ENCODINGS = ("none", "zstd")
ZSTD_MAX_WINDOW = 1 << 24  # the writer's zstd level uses at most 8 MiB; a larger window is refused, not allocated
DELTA_KIND_WORDS = "an update file made by 'trtx-bundle diff'"
NOT_A_DELTA = "the file is not an update made by 'trtx-bundle diff', or it was damaged in transit: fetch it again"


@dataclass(frozen=True, kw_only=True)
class Section(Record):
    """One run of bytes in the payload: ``name`` says what it becomes, ``size`` how many bytes it takes here."""

    name: str  # manifest.json | manifest.sig | <folder>/<sha256>.<ext> (a file NEW pins) | weights.literals
    size: Count  # bytes in the update file (stored: compressed where encoding is zstd)
    encoding: Annotated[str, Key(check=one_of(SECTION_ENCODINGS))] = "none"


@dataclass(frozen=True, kw_only=True)
class Op(Record):
    """One step of the weight recipe: ``size`` bytes copied from OLD's weight file at ``offset``, or the next ``size``
    bytes of the literals section."""

    source: Annotated[str, Key(name="from", check=one_of(("old", "delta")))]
    offset: Count | None = None  # in OLD's weight file (from "old" only)
    size: Count

    def validate(self, path: str) -> None:
        if self.size == 0:
            raise ManifestError(f"{at(path, 'size')}: 0, expected at least one byte")
        if (self.offset is None) != (self.source == "delta"):
            raise ManifestError(f"{at(path, 'offset')}: required with from 'old', absent with from 'delta'")


@dataclass(frozen=True, kw_only=True)
class WeightsRecipe(Record):
    """How NEW's weight file is made from OLD's: ``ops`` in order write the whole file, from byte 0 to its end."""

    file: FileRef  # NEW's weight file, as NEW's manifest pins it
    source: FileRef  # OLD's weight file, as OLD's manifest pins it
    ops: tuple[Op, ...]


@dataclass(frozen=True, kw_only=True)
class DeltaHeader(Record):
    """The update file's header (docs/DELTA.md)."""

    JSON_CONSTANTS: ClassVar[Mapping[str, Any]] = {"kind": DELTA_KIND}

    schema_version: int = DELTA_SCHEMA_VERSION
    old_manifest_sha256: Annotated[Sha256, Key("old.manifest_sha256")]  # the bundle it applies to
    new_manifest_sha256: Annotated[Sha256, Key("new.manifest_sha256")]  # the bundle it makes
    sections: tuple[Section, ...]
    weights: WeightsRecipe | None = None  # None: NEW's weight file is OLD's
    tool: str = ""  # what wrote it, for people

    def to_json(self) -> bytes:
        return canonical_json(self.to_dict())

    def validate(self, path: str) -> None:
        names = [s.name for s in self.sections]
        if not names or names[0] != "manifest.json":
            raise ManifestError(f"{at(path, 'sections[0].name')}: expected manifest.json first")
        for i, s in enumerate(self.sections):
            where = at(path, f"sections[{i}]")
            if s.name in names[:i]:
                raise ManifestError(f"{where}.name: {s.name!r} appears twice (each section is one file, once)")
            if s.name in ("manifest.json", "manifest.sig") and s.encoding != "none":
                raise ManifestError(f"{where}.encoding: {s.encoding!r}, expected none for {s.name}")
            if s.name == "manifest.sig" and i != 1:
                raise ManifestError(f"{where}.name: manifest.sig comes right after manifest.json")
            if s.name == LITERALS and i != len(names) - 1:
                raise ManifestError(f"{where}.name: {LITERALS} comes last")
        literal = sum(op.size for op in self.weights.ops if op.source == "delta") if self.weights else 0
        declared = next((s.size for s in self.sections if s.name == LITERALS), 0)
        if literal != declared:
            raise ManifestError(
                f"{at(path, 'weights.ops')}: {literal} literal bytes, but the {LITERALS} section holds {declared}"
            )


@dataclass(frozen=True)
class DeltaFile:
    """An update file whose trailer and header passed their checks: the header, and where each section starts."""

    path: Path
    size: int
    header: DeltaHeader
    offsets: Mapping[str, int]  # section name -> offset of its first byte in the file
    warnings: tuple[str, ...] = ()

    def section(self, name: str) -> Section | None:
        return next((s for s in self.header.sections if s.name == name), None)

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        f, size = _open(self.path)
        if size != self.size:
            f.close()
            raise DeltaError(f"{self.path}: {size} bytes now, {self.size} when its header was read: changed meanwhile")
        with f:
            yield f

    def read_small(self, f: BinaryIO, name: str, cap: int) -> bytes:
        """A whole uncompressed section of at most ``cap`` bytes (manifest.json, manifest.sig)."""
        s = self.section(name)
        assert s is not None
        if s.size > cap:
            raise DeltaError(
                f"{self.path}: section {name} declares {s.size} bytes, more than the {cap} allowed", hint=NOT_A_DELTA
            )
        f.seek(self.offsets[name])
        data = f.read(s.size)
        if len(data) != s.size:
            raise DeltaError(f"{self.path}: truncated inside section {name}", hint=NOT_A_DELTA)
        return data

    def reader(self, f: BinaryIO, name: str, expected_size: int) -> SectionReader:
        """The section's decoded bytes (``read``); DeltaError once they are more than ``expected_size`` bytes, and at
        ``finish`` unless they were exactly that many with no stored byte left over."""
        s = self.section(name)
        assert s is not None
        f.seek(self.offsets[name])
        return SectionReader(self.path, s, _Bounded(f, s.size), expected_size)


class SectionReader:
    """One section's bytes as NEW's manifest expects them: plain, or zstd-decoded with a bounded window and output."""

    def __init__(self, path: Path, section: Section, raw: _Bounded, expected_size: int) -> None:
        self.path, self.section, self.raw, self.expected = path, section, raw, expected_size
        self.done = 0
        self._zstd: Any = None
        if section.encoding == "none" and section.size != expected_size:
            raise DeltaError(
                f"{path}: section {section.name} holds {section.size} bytes, but NEW's manifest pins {expected_size}",
                hint=NOT_A_DELTA,
            )
        if section.encoding == "zstd":
            import zstandard

            self._zstd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
                raw,  # type: ignore[arg-type]  # anything with read() will do
                read_size=CHUNK,
                read_across_frames=True,
            )

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (fewer only at the end); one byte past the expected size is an error, never more."""
        n = min(n, self.expected + 1 - self.done)
        if self._zstd is None:
            data = self.raw.read(n)
        else:
            import zstandard

            try:
                parts, want = [], n
                while want and (part := self._zstd.read(want)):
                    parts.append(part)
                    want -= len(part)
                data = b"".join(parts)
            except zstandard.ZstdError as e:
                name = self.section.name
                raise DeltaError(f"{self.path}: section {name}: corrupt zstd data ({e})", hint=NOT_A_DELTA) from None
        self.done += len(data)
        if self.done > self.expected:
            raise DeltaError(
                f"{self.path}: section {self.section.name} decodes to more than the {self.expected} bytes NEW's "
                "manifest pins",
                hint=NOT_A_DELTA,
            )
        return data

    def read_exact(self, n: int) -> bytes:
        data = self.read(n)
        if len(data) != n:
            self.finish()  # names the shortfall
        return data

    def finish(self) -> None:
        if self.done == self.expected and self.read(1):
            pass  # read() has raised: one byte too many
        if self.done != self.expected:
            raise DeltaError(
                f"{self.path}: section {self.section.name} decodes to {self.done} bytes, not the {self.expected} "
                "bytes NEW's manifest pins",
                hint=NOT_A_DELTA,
            )
        if self.raw.left:
            raise DeltaError(
                f"{self.path}: section {self.section.name}: {self.raw.left} stored bytes left over after its data",
                hint=NOT_A_DELTA,
            )


class _Bounded:
    """At most ``left`` bytes of ``f`` from where it stands; running short of them is a truncated update file."""

    def __init__(self, f: BinaryIO, left: int) -> None:
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        if len(data) != n:
            raise DeltaError(f"{getattr(self.f, 'name', 'update file')}: truncated", hint=NOT_A_DELTA)
        self.left -= n
        return data


def _open(path: Path) -> tuple[BinaryIO, int]:
    try:
        return open_regular_file(path, DELTA_KIND_WORDS, error=DeltaError)
    except FileNotFoundError:
        raise DeltaError(f"{path}: not found; expected {DELTA_KIND_WORDS}") from None


def read_delta(path: str | os.PathLike[str]) -> DeltaFile:
    """The update file's header and section offsets, every layout rule checked; DeltaError naming the file otherwise."""
    src = Path(path)
    f, size = _open(src)
    with f:
        if size < len(START_MAGIC) + TRAILER.size:
            raise DeltaError(f"{src}: {size} bytes, too short for {DELTA_KIND_WORDS}: truncated", hint=NOT_A_DELTA)
        head = f.read(len(START_MAGIC))
        if head != START_MAGIC:
            raise DeltaError(
                f"{src}: starts with {head[:8]!r}, expected {START_MAGIC!r} ({DELTA_KIND_WORDS})", hint=NOT_A_DELTA
            )
        f.seek(size - TRAILER.size)
        header_size, end = TRAILER.unpack(f.read(TRAILER.size))
        if end != END_MAGIC:
            raise DeltaError(
                f"{src}: no end marker {END_MAGIC!r} in its last 8 bytes: truncated or damaged", hint=NOT_A_DELTA
            )
        if header_size > min(MAX_HEADER_BYTES, size - len(START_MAGIC) - TRAILER.size):
            raise DeltaError(
                f"{src}: declares a header of {header_size} bytes, more than the file holds or "
                f"the {MAX_HEADER_BYTES} allowed",
                hint=NOT_A_DELTA,
            )
        header_at = size - TRAILER.size - header_size
        f.seek(header_at)
        raw = f.read(header_size)
    header, warnings = parse_header(raw, source=f"{src}: header")
    offsets, pos = {}, len(START_MAGIC)
    for s in header.sections:
        offsets[s.name] = pos
        pos += s.size
    if pos != header_at:
        raise DeltaError(
            f"{src}: the header lists {pos - len(START_MAGIC)} bytes of sections, but {header_at - len(START_MAGIC)} "
            "lie between the start magic and the header",
            hint=NOT_A_DELTA,
        )
    return DeltaFile(path=src, size=size, header=header, offsets=offsets, warnings=tuple(warnings))


def parse_header(raw: bytes, *, source: str) -> tuple[DeltaHeader, list[str]]:
    """Parse and check a header's JSON; DeltaError naming ``source`` otherwise."""
    try:
        data = parse_json(raw, source=source, corrupt_hint=NOT_A_DELTA)
        if not isinstance(data, Mapping) or data.get("kind") != DELTA_KIND:
            got = data.get("kind") if isinstance(data, Mapping) else kind_name(data)
            raise ManifestError(f'{source}: expected "kind": "{DELTA_KIND}", got {got!r}')
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ManifestError(f"{source}: schema_version: expected an integer >= 1, got {version!r}")
        if version > DELTA_SCHEMA_VERSION:
            raise DeltaError(
                f"{source}: update schema_version {version} is newer than this runtime reads (up to "
                f"{DELTA_SCHEMA_VERSION})",
                hint="update the app's trtx-runtime, or make the update with the trtx-bundler release it ships with",
            )
        warnings: list[str] = []
        header = DeltaHeader.parse(data, warnings=warnings)
    except ManifestError as e:
        message = str(e) if str(e).startswith(source) else f"{source}: {e}"
        raise DeltaError(message, hint=e.hint or NOT_A_DELTA) from None
    return header, warnings


def frame_hasher(name: str) -> Any:
    """An incremental hasher of frame digest kind ``name`` (store/digest.py): ``update`` then ``hexdigest``."""
    digest_function(name)  # the clear error where the blake3 package is missing
    if name == "blake3":
        from blake3 import blake3

        return blake3()
    return hashlib.sha256()
