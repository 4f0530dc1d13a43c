"""How a bundle names its files: every file but manifest.json is ``<folder>/<sha256>.<ext>``, pinned by a FileRef."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ManifestError
from .schema import Count, Record, Sha256

# The name is the content: a file's folder says what it is, its stem is the sha256 of its bytes.
FILE_FOLDERS = {"engines": ".engine", "caches": ".cache", "weights": ".trtxw", "skeleton": ".onnx"}
_FILE_RE = re.compile(r"^(engines|caches|weights|skeleton)/([0-9a-f]{64})\.(engine|cache|trtxw|onnx)$")


@dataclass(frozen=True, kw_only=True)
class FileRef(Record):
    """A content-addressed file of the bundle: ``path`` is ``<folder>/<sha256>.<ext>``."""

    path: str
    sha256: Sha256
    size: Count

    @classmethod
    def for_content(cls, folder: str, sha256: str, size: int) -> FileRef:
        return cls(path=f"{folder}/{sha256}{FILE_FOLDERS[folder]}", sha256=sha256, size=size)

    def validate(self, path: str) -> None:
        """The path is one of the bundle's file names and names this very content (no ``..``, no other folder)."""
        m = _FILE_RE.match(self.path)
        if not m or FILE_FOLDERS[m.group(1)] != "." + m.group(3):
            raise ManifestError(
                f"{path}.path: expected '<engines|caches|weights|skeleton>/<sha256>.<ext>', got {self.path!r}"
            )
        if m.group(2) != self.sha256:
            raise ManifestError(f"{path}.path: file name {m.group(2)} does not match sha256 {self.sha256}")
