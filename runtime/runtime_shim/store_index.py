"""The weight store's index in manifest.json: blobs, their frames and the tensors that use them (docs/WEIGHT_STORE.md).

The bytes themselves are read by ``store/``; these records say where every tensor's bytes are and how to check them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from .bundle_files import FileRef
from .errors import ManifestError
from .schema import Count, Ints, Key, Name, Record, Sha256, one_of

WEIGHT_ENCODINGS = ("none", "zstd", "zstd-byteplane")
DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
    "float8e4m3fn",
    "int4",
    "uint4",
)
DType = Annotated[str, Key(check=one_of(DTYPES))]


def _element_size(v: int) -> str | None:
    return None if v in (1, 2, 4, 8) else f"expected 1, 2, 4 or 8, got {v}"


def _positive(v: int) -> str | None:
    return None if v > 0 else "expected > 0"


@dataclass(frozen=True, kw_only=True)
class Frame(Record):
    """One independently decodable piece of a blob in the weight store file."""

    offset: Count  # in the weight store file
    size: Count  # stored bytes
    raw_size: Count  # bytes after decoding
    sha256: Sha256  # of the stored bytes, checked before decoding


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
        if (total := sum(f.raw_size for f in self.frames)) != self.nbytes:
            raise ManifestError(f"{path}.frames: raw sizes add up to {total}, expected nbytes {self.nbytes}")


@dataclass(frozen=True, kw_only=True)
class WeightTensor(Record):
    name: Name  # the ONNX initializer name, which TRT-RTX refit uses
    dtype: DType
    shape: Ints
    blob: Count  # index into WeightStore.blobs


@dataclass(frozen=True, kw_only=True)
class WeightStore(Record):
    """Index of the weight store file (format: docs/WEIGHT_STORE.md)."""

    file: FileRef
    raw_size: Count  # size of the unpacked layout, alignment padding included
    alignment: Annotated[int, Key(check=_positive)]
    blobs: tuple[Blob, ...]
    tensors: tuple[WeightTensor, ...]

    def tensor(self, name: str) -> WeightTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def validate(self, path: str) -> None:
        """Tensor names are unique, blob indexes exist, blobs fit the layout, frames fit the file."""
        names: set[str] = set()
        for i, t in enumerate(self.tensors):
            where = f"{path}.tensors[{i}]"
            if t.name in names:
                raise ManifestError(f"{where}.name: duplicate tensor name {t.name!r}")
            names.add(t.name)
            if t.blob >= len(self.blobs):
                raise ManifestError(f"{where}.blob: index {t.blob} out of range ({len(self.blobs)} blobs)")
        for i, b in enumerate(self.blobs):
            if b.raw_offset + b.nbytes > self.raw_size:
                raise ManifestError(
                    f"{path}.blobs[{i}]: raw bytes end at {b.raw_offset + b.nbytes}, past raw_size {self.raw_size}"
                )
            for j, f in enumerate(b.frames):
                if f.offset + f.size > self.file.size:
                    raise ManifestError(
                        f"{path}.blobs[{i}].frames[{j}]: ends at {f.offset + f.size}, past the file size {self.file.size}"
                    )
