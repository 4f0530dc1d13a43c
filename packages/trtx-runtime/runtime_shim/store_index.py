"""The weight store's index in manifest.json: blobs, their frames and the tensors that use them (docs/WEIGHT_STORE.md).

The bytes themselves are read by ``store/``; these records say where every tensor's bytes are and how to check them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from .bundle_files import FileRef
from .errors import ManifestError
from .schema import Count, Ints, Key, Name, Record, Sha256, one_of
from .store.digest import DEFAULT_FRAME_DIGEST, FRAME_DIGESTS
from .store.format import ENCODINGS, ITEMSIZE, MAGIC, PLANE_WIDTHS, ZSTD_MAX_RATIO, nbytes_for

WEIGHT_ENCODINGS = ENCODINGS  # "none" | "zstd" | "zstd-byteplane": the format's own list (store/format.py)
DTYPES = tuple(ITEMSIZE)
MAX_ALIGNMENT = 1 << 16  # the writer aligns to 64; a larger value only inflates the unpacked layout
HINT_INDEX = (
    "the weight index in manifest.json does not describe its weight file (the manifest was edited or damaged); "
    "fetch the bundle again or rebuild it"
)
DType = Annotated[str, Key(check=one_of(DTYPES))]


def _element_size(v: int) -> str | None:
    return None if v in (1, 2, 4, 8) else f"expected 1, 2, 4 or 8, got {v}"


def _alignment(v: int) -> str | None:
    ok = 0 < v <= MAX_ALIGNMENT and not v & (v - 1)
    return None if ok else f"expected a power of two from 1 to {MAX_ALIGNMENT}, got {v}"


def _bad(where: str, problem: str) -> ManifestError:
    return ManifestError(f"{where}: {problem}", hint=HINT_INDEX)


@dataclass(frozen=True, kw_only=True)
class Frame(Record):
    """One independently decodable piece of a blob in the weight store file."""

    offset: Count  # in the weight store file
    size: Count  # stored bytes
    raw_size: Count  # bytes after decoding
    digest: Sha256  # of the stored bytes (the store's frame_digest: BLAKE3 or sha256, 64 hex digits), checked before decoding


@dataclass(frozen=True, kw_only=True)
class Blob(Record):
    """The bytes of one or more identical tensors, stored once."""

    sha256: Sha256  # of the raw bytes
    nbytes: Count
    raw_offset: Count  # where the raw bytes sit in the unpacked layout (the skeleton's external data file)
    encoding: Annotated[str, Key(check=one_of(WEIGHT_ENCODINGS))]  # "none" | "zstd" | "zstd-byteplane"
    element_size: Annotated[int, Key(check=_element_size)]  # byte-plane width; 1 means no split
    frames: tuple[Frame, ...]

    def validate(self, path: str) -> None:
        """The blob's own rules: an element size its encoding can use, and frames that tile its raw bytes, each frame
        with at least one stored and one raw byte and no more raw bytes than its stored bytes can decode to."""
        split = self.encoding == "zstd-byteplane"
        if split and self.element_size not in PLANE_WIDTHS:
            raise _bad(f"{path}.element_size", f"{self.element_size} for zstd-byteplane, expected 2, 4 or 8")
        if not split and self.element_size != 1:
            raise _bad(
                f"{path}.element_size", f"{self.element_size} for {self.encoding}, expected 1 (no byte-plane split)"
            )
        for j, f in enumerate(self.frames):
            where = f"{path}.frames[{j}]"
            if f.size == 0 or f.raw_size == 0:
                raise _bad(where, f"size {f.size}, raw_size {f.raw_size}: a frame holds at least one byte of each")
            if self.encoding == "none" and f.size != f.raw_size:
                raise _bad(
                    where,
                    f"size {f.size}, raw_size {f.raw_size}: an encoding 'none' frame stores its bytes as they are",
                )
            if f.raw_size > f.size * ZSTD_MAX_RATIO:
                raise _bad(
                    f"{where}.raw_size",
                    f"{f.raw_size} bytes from {f.size} stored bytes: more than zstd can decode to (at most {ZSTD_MAX_RATIO} x)",
                )
            if f.raw_size % self.element_size:
                raise _bad(
                    f"{where}.raw_size", f"{f.raw_size} is not a whole number of {self.element_size}-byte elements"
                )
        if (total := sum(f.raw_size for f in self.frames)) != self.nbytes:
            raise _bad(f"{path}.frames", f"raw sizes add up to {total}, expected nbytes {self.nbytes}")


@dataclass(frozen=True, kw_only=True)
class StoreIndex(Record):
    """The manifest's ``weights``: the weight store file and its blobs, shared by every model of the bundle."""

    file: FileRef
    raw_size: Count  # size of the unpacked layout, alignment padding included
    alignment: Annotated[int, Key(check=_alignment)]
    # What every frame's ``digest`` is (store/digest.py); schema 1 manifests pinned frames by sha256.
    frame_digest: Annotated[str, Key(check=one_of(FRAME_DIGESTS), required=True)] = DEFAULT_FRAME_DIGEST
    blobs: tuple[Blob, ...]

    def validate(self, path: str) -> None:
        """The blobs lie back to back (aligned) in the unpacked layout that ``raw_size`` ends, and their frames lie back
        to back in the file, in blob order, from the magic to its end (docs/WEIGHT_STORE.md, "The index")."""
        self._check_raw_layout(path)
        self._check_file_layout(path)

    def with_tensors(self, tensors: tuple[WeightTensor, ...]) -> WeightStore:
        """The store as one model sees it: this index and that model's tensors."""
        return WeightStore(**{f: getattr(self, f) for f in StoreIndex.__dataclass_fields__}, tensors=tensors)

    def _check_raw_layout(self, path: str) -> None:
        end = 0  # each blob starts where the one before it ends, rounded up to the alignment (what the writer does)
        for i, b in enumerate(self.blobs):
            start = -(-end // self.alignment) * self.alignment
            if b.raw_offset != start:
                raise _bad(
                    f"{path}.blobs[{i}].raw_offset",
                    f"{b.raw_offset}, expected {start} (blobs lie back to back in the unpacked layout, "
                    f"each at a multiple of the alignment {self.alignment})",
                )
            end = start + b.nbytes
        if self.raw_size != end:
            raise _bad(f"{path}.raw_size", f"{self.raw_size}, expected {end} (where the last blob ends)")

    def _check_file_layout(self, path: str) -> None:
        pos = len(MAGIC)  # the frames follow the magic back to back: blob 0's in order, then blob 1's, ...
        for i, b in enumerate(self.blobs):
            for j, f in enumerate(b.frames):
                if f.offset != pos:
                    problem = (
                        "overlaps the frame before it" if f.offset < pos else "leaves a gap after the frame before it"
                    )
                    raise _bad(
                        f"{path}.blobs[{i}].frames[{j}].offset",
                        f"{f.offset}, expected {pos}: {problem} (frames lie back to back in the file, in blob order)",
                    )
                pos += f.size
        if self.file.size != pos:
            raise _bad(
                f"{path}.file.size",
                f"{self.file.size} bytes, but the frames end at {pos}"
                + ("; the index lists no weights" if not self.blobs else ""),
            )


@dataclass(frozen=True, kw_only=True)
class WeightTensor(Record):
    name: Name  # the ONNX initializer name, which TRT-RTX refit uses
    dtype: DType
    shape: Ints
    blob: Count  # index into the store's blobs


@dataclass(frozen=True, kw_only=True)
class WeightStore(StoreIndex):
    """The weight store as one model reads it: the shared index and that model's tensors (docs/WEIGHT_STORE.md)."""

    tensors: tuple[WeightTensor, ...]

    def tensor(self, name: str) -> WeightTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def index(self) -> StoreIndex:
        """The shared part, without this model's tensors."""
        return StoreIndex(**{f: getattr(self, f) for f in StoreIndex.__dataclass_fields__})

    def validate(self, path: str) -> None:
        """The index describes its file exactly, before a byte of it is read (docs/WEIGHT_STORE.md, "The index"):
        each tensor's dtype x shape is its blob's size, and the index's own layout rules (StoreIndex.validate). So no
        reader, decoder or refit is ever handed a size the file does not back."""
        self.check_tensors(f"{path}.tensors", path)
        super().validate(path)

    def check_tensors(self, tensors_path: str, path: str) -> None:
        """Each tensor names a blob of its exact size (and plane width): ``tensors_path`` is where the manifest lists
        the tensors (a model's ``tensors``), ``path`` where it lists the blobs (``weights``)."""
        names: set[str] = set()
        for i, t in enumerate(self.tensors):
            where = f"{tensors_path}[{i}]"
            if t.name in names:
                raise ManifestError(f"{where}.name: duplicate tensor name {t.name!r}")
            names.add(t.name)
            if t.blob >= len(self.blobs):
                raise ManifestError(f"{where}.blob: index {t.blob} out of range ({len(self.blobs)} blobs)")
            blob = self.blobs[t.blob]
            if (need := nbytes_for(t.dtype, t.shape)) != blob.nbytes:
                raise _bad(
                    where,
                    f"{t.dtype} {list(t.shape)} is {need} bytes, but its blob {t.blob} has {blob.nbytes} "
                    f"({path}.blobs[{t.blob}].nbytes)",
                )
            if blob.encoding == "zstd-byteplane" and blob.element_size != ITEMSIZE[t.dtype]:
                raise _bad(
                    where,
                    f"{t.dtype} has {ITEMSIZE[t.dtype]}-byte elements, but its blob {t.blob} is split into "
                    f"{blob.element_size} byte planes ({path}.blobs[{t.blob}].element_size)",
                )
