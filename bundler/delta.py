"""`trtx-bundle diff`: an update file (.trtxd) that turns bundle OLD into NEW, holding only the bytes OLD lacks.

What OLD lacks is found by content, never by position: a file NEW pins whose sha256 OLD also pins travels as a
reference (nothing), any other file travels whole (zstd-compressed where that saves at least 2%: engines and caches
compress well), and NEW's weight file, where OLD lacks it, travels as a recipe over its frames: a frame whose (frame
digest, size) OLD's index also pins is copied from OLD's weight file (runs of consecutive frames as one copy), any
other frame's stored bytes travel as they are (they are zstd frames already). The layout is docs/DELTA.md's and
runtime_shim.delta_format's; the runtime applies it (runtime_shim.delta). Every byte taken from NEW is checked
against NEW's manifest as it is copied, so a damaged NEW never becomes an update. Memory stays bounded: files and
frames are streamed in chunks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from runtime_shim import __version__
from runtime_shim.delta_format import (
    END_MAGIC,
    LITERALS,
    START_MAGIC,
    TRAILER,
    DeltaHeader,
    Op,
    Section,
    WeightsRecipe,
    frame_hasher,
)
from runtime_shim.errors import BundleError, IntegrityError
from runtime_shim.fsutil import (
    CHUNK,
    atomic_writer,
    disk_errors,
    open_regular_file,
    owned_temp_dir,
    read_regular_file,
    sha256_bytes,
    sweep_stale_temp_dirs,
)
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest, FileRef, read_bundle_manifest
from runtime_shim.signing import MAX_SIGNATURE_BYTES, SIGNATURE_NAME
from runtime_shim.store.format import MAGIC

DEFAULT_LEVEL = 10  # zstd level for whole files (bench/README.md, "Delta updates")
MIN_SAVING = 0.02  # a file zstd shrinks by less than this travels as it is: decoding it would cost for nothing
Progress = Callable[[str, int, int], None]  # (what, bytes done, bytes in all)


@dataclass(frozen=True, kw_only=True)
class DiffResult:
    """What ``diff_bundles`` wrote, and how NEW's bytes split between OLD and the update."""

    path: str
    size: int  # bytes of the update file
    old_manifest_sha256: str
    new_manifest_sha256: str
    new_bytes: int  # NEW's files, manifest.json and manifest.sig
    reused: list[str] = field(default_factory=list)  # NEW's files taken whole from OLD
    carried: list[str] = field(default_factory=list)  # NEW's files carried whole
    carried_bytes: int = 0  # their size
    carried_stored: int = 0  # what they take in the update
    weight_frames: int = 0  # frames of NEW's weight file, where the update makes it
    weight_frames_copied: int = 0
    weight_bytes_copied: int = 0
    weight_bytes_literal: int = 0
    signed: bool = False

    @property
    def share(self) -> float:
        return self.size / self.new_bytes if self.new_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "share": round(self.share, 6)}


def diff_bundles(
    old_dir: str | os.PathLike[str],
    new_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    level: int = DEFAULT_LEVEL,
    progress: Progress | None = None,
) -> DiffResult:
    """Write the update file ``out`` that turns the bundle at ``old_dir`` into the one at ``new_dir`` (atomically).

    Either may be a ``.trtx`` archive: it is unpacked (and checked) into a temp directory beside ``out`` first."""
    with contextlib.ExitStack() as stack:
        old_path, new_path = (_as_directory(Path(p), Path(out), stack) for p in (old_dir, new_dir))
        return _diff(old_path, new_path, Path(out), level=level, progress=progress)


def _as_directory(path: Path, out: Path, stack: contextlib.ExitStack) -> Path:
    if not path.is_file():
        return path
    from runtime_shim.archive import extract_archive

    with disk_errors(out, f"cannot unpack {path} beside the update", "nothing was written"):
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temp_dirs(out.parent, f".{out.name}.diff-")
        tmp = stack.enter_context(owned_temp_dir(out.parent, f".{out.name}.diff-"))
        extract_archive(path, tmp / "bundle")
    return tmp / "bundle"


def _diff(old_path: Path, new_path: Path, out_path: Path, *, level: int, progress: Progress | None) -> DiffResult:
    old, _w, old_sha = read_bundle_manifest(old_path)
    new, _w, new_sha = read_bundle_manifest(new_path)
    new_raw = read_regular_file(new_path / MANIFEST_NAME, 64 << 20, "manifest.json", error=IntegrityError)
    if sha256_bytes(new_raw) != new_sha:
        raise IntegrityError(f"{new_path / MANIFEST_NAME}: changed while diff read it", hint="run diff again")
    if old_sha == new_sha:
        raise BundleError(
            f"{old_path} and {new_path} hold the same manifest.json (sha256 {old_sha}): there is nothing to update",
            hint="pass the bundle users have as OLD and the new release as NEW",
        )
    signature = None
    if (new_path / SIGNATURE_NAME).exists():
        signature = read_regular_file(new_path / SIGNATURE_NAME, MAX_SIGNATURE_BYTES, "manifest.sig", error=BundleError)
    old_shas = {ref.sha256 for _key, ref in old.files()}
    weights_new = new.weights.file.sha256 not in old_shas
    carried = [ref for key, ref in new.files() if ref.sha256 not in old_shas and key != "weights.file"]
    result: dict[str, Any] = {
        "reused": [ref.path for _key, ref in new.files() if ref.sha256 in old_shas],
        "carried": [ref.path for ref in carried],
        "carried_bytes": sum(ref.size for ref in carried),
    }
    recipe = _recipe(old_path, old, new) if weights_new else None
    say = progress or (lambda what, done, total: None)
    sections: list[Section] = []
    with disk_errors(out_path, "cannot write the update", "nothing was written"):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(out_path) as f:
            f.write(START_MAGIC)
            sections.append(_plain(f, MANIFEST_NAME, new_raw))
            if signature is not None:
                sections.append(_plain(f, SIGNATURE_NAME, signature))
            for ref in carried:
                sections.append(_carry(f, new_path / ref.path, ref, level, say))
            if recipe is not None and (literal := sum(op.size for op in recipe.ops if op.source == "delta")):
                start = f.tell()
                _literals(f, new_path / new.weights.file.path, new, recipe, say)
                sections.append(Section(name=LITERALS, size=f.tell() - start))
                assert f.tell() - start == literal
            header = DeltaHeader(
                old_manifest_sha256=old_sha,
                new_manifest_sha256=new_sha,
                sections=tuple(sections),
                weights=recipe,
                tool=f"trtx-bundler {__version__}",
            ).to_json()
            f.write(header)
            f.write(TRAILER.pack(len(header), END_MAGIC))
            size = f.tell()
    frames = [fr for b in new.weights.blobs for fr in b.frames] if recipe is not None else []
    copied_bytes = sum(op.size for op in recipe.ops if op.source == "old") if recipe else 0
    return DiffResult(
        path=str(out_path),
        size=size,
        old_manifest_sha256=old_sha,
        new_manifest_sha256=new_sha,
        new_bytes=sum(ref.size for _k, ref in new.files()) + len(new_raw) + len(signature or b""),
        carried_stored=sum(s.size for s in sections if s.name not in (MANIFEST_NAME, SIGNATURE_NAME, LITERALS)),
        weight_frames=len(frames),
        weight_frames_copied=_copied_frames(recipe, frames),
        weight_bytes_copied=copied_bytes,
        weight_bytes_literal=new.weights.file.size - copied_bytes if recipe else 0,
        signed=signature is not None,
        **result,
    )


# --------------------------------------------------------------------------- the weight recipe
def _recipe(old_path: Path, old: BundleManifest, new: BundleManifest) -> WeightsRecipe:
    """Copy every frame (and the magic) OLD has, by (digest, size); carry the rest; merge adjacent steps."""
    if old.weights.frame_digest == new.weights.frame_digest:
        index = {(f.digest, f.size): f.offset for b in old.weights.blobs for f in b.frames}
    else:
        index = _rehash(old_path / old.weights.file.path, old, new.weights.frame_digest)
    ops: list[list[Any]] = [["old", 0, len(MAGIC)]]
    for b in new.weights.blobs:
        for f in b.frames:
            at = index.get((f.digest, f.size))
            last = ops[-1]
            if at is None:
                if last[0] == "delta":
                    last[2] += f.size
                else:
                    ops.append(["delta", None, f.size])
            elif last[0] == "old" and last[1] + last[2] == at:
                last[2] += f.size
            else:
                ops.append(["old", at, f.size])
    return WeightsRecipe(
        file=new.weights.file,
        source=old.weights.file,
        ops=tuple(Op(source=s, offset=o, size=n) for s, o, n in ops),
    )


def _rehash(path: Path, old: BundleManifest, kind: str) -> dict[tuple[str, int], int]:
    """OLD's frames by NEW's kind of digest (OLD pins them by another: an upgraded schema-1 bundle, say)."""
    index: dict[tuple[str, int], int] = {}
    f, _size = open_regular_file(path, "the bundle's weight file", error=IntegrityError)
    with f:
        for b in old.weights.blobs:
            for fr in b.frames:
                f.seek(fr.offset)
                h = frame_hasher(kind)
                left = fr.size
                while left and (chunk := f.read(min(CHUNK, left))):
                    h.update(chunk)
                    left -= len(chunk)
                if not left:
                    index.setdefault((h.hexdigest(), fr.size), fr.offset)
    return index


def _spans(recipe: WeightsRecipe, source: str) -> list[tuple[int, int]]:
    """Where in NEW's weight file the ops from ``source`` write: (start, end) pairs, in order."""
    spans, pos = [], 0
    for op in recipe.ops:
        if op.source == source:
            spans.append((pos, pos + op.size))
        pos += op.size
    return spans


def _within(offsets: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    """For each of ``offsets`` (ascending), whether it lies in one of ``spans`` (ascending, disjoint)."""
    out, k = [], 0
    for x in offsets:
        while k < len(spans) and spans[k][1] <= x:
            k += 1
        out.append(k < len(spans) and spans[k][0] <= x)
    return out


def _copied_frames(recipe: WeightsRecipe | None, frames: list[Any]) -> int:
    return sum(_within([fr.offset for fr in frames], _spans(recipe, "old"))) if recipe else 0


# --------------------------------------------------------------------------- writing sections
def _plain(f: BinaryIO, name: str, data: bytes) -> Section:
    f.write(data)
    return Section(name=name, size=len(data))


def _carry(f: BinaryIO, src: Path, ref: FileRef, level: int, say: Progress) -> Section:
    """One whole file of NEW, checked against its pin as it is read: zstd where that saves MIN_SAVING, else as is."""
    import zstandard

    start = f.tell()
    writer = zstandard.ZstdCompressor(level=level).stream_writer(f, size=ref.size, closefd=False)
    _copy_checked(src, ref, writer.write, say)
    writer.flush(zstandard.FLUSH_FRAME)
    if f.tell() - start <= ref.size * (1 - MIN_SAVING):
        return Section(name=ref.path, size=f.tell() - start, encoding="zstd")
    f.seek(start)
    f.truncate()
    _copy_checked(src, ref, f.write, say)
    return Section(name=ref.path, size=ref.size)


def _copy_checked(src: Path, ref: FileRef, write: Callable[[bytes], Any], say: Progress) -> None:
    import hashlib

    h, size = hashlib.sha256(), 0
    f, _size = open_regular_file(src, f"a bundle file pinned with {ref.size} bytes", error=IntegrityError)
    with f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            if size > ref.size:
                break
            write(chunk)
            say(ref.path, size, ref.size)
    if (h.hexdigest(), size) != (ref.sha256, ref.size):
        raise IntegrityError(
            f"{src}: sha256 {h.hexdigest()} ({size} bytes), expected {ref.sha256} ({ref.size} bytes): NEW is damaged",
            hint="run 'trtx-bundle verify' on NEW; nothing was written",
        )


def _literals(f: BinaryIO, src: Path, new: BundleManifest, recipe: WeightsRecipe, say: Progress) -> None:
    """NEW's frames the recipe carries, each checked against its pinned digest as it is copied."""
    every = [
        (fr, f"weights.blobs[{i}].frames[{j}]")
        for i, b in enumerate(new.weights.blobs)
        for j, fr in enumerate(b.frames)
    ]
    carried = _within([fr.offset for fr, _ in every], _spans(recipe, "delta"))
    frames = [pair for pair, c in zip(every, carried) if c]
    total, done = sum(fr.size for fr, _ in frames), 0
    w, _size = open_regular_file(src, "the bundle's weight file", error=IntegrityError)
    with w:
        for fr, where in frames:
            w.seek(fr.offset)
            h = frame_hasher(new.weights.frame_digest)
            left = fr.size
            while left and (chunk := w.read(min(CHUNK, left))):
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
            if left or h.hexdigest() != fr.digest:
                raise IntegrityError(
                    f"{src}: {where} (offset {fr.offset}, {fr.size} bytes) does not match its digest: NEW is damaged",
                    hint="run 'trtx-bundle verify' on NEW; nothing was written",
                )
            done += fr.size
            say("weights", done, total)
