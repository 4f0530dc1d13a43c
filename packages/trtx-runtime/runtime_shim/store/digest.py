"""The digests a weight store index can pin its frames by: BLAKE3 (what the bundler writes) or sha256 (schema 1).

Every load hashes every frame it reads (docs/WEIGHT_STORE.md, "Verification"), so the frame digest is on the load's
critical path: BLAKE3 hashes ~3x faster than sha256 per core on the same frames (bench/bench_verify.py) and, like
hashlib, releases the GIL while it hashes, so the decode threads hash side by side. Whole files stay pinned by sha256
(bundle_files.py): those pins name files and are checked far less often.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from ..errors import BundleError

FRAME_DIGESTS: tuple[str, ...] = ("blake3", "sha256")
DEFAULT_FRAME_DIGEST = "blake3"

Digest = Callable[[Any], str]  # a buffer (bytes, bytearray, memoryview) -> 64 lowercase hex digits


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_function(name: str) -> Digest:
    """The function that computes frame digests of kind ``name`` (one of FRAME_DIGESTS)."""
    if name == "sha256":
        return _sha256
    if name == "blake3":
        try:
            from blake3 import blake3
        except ImportError:
            raise BundleError(
                "this bundle's weight frames are pinned by BLAKE3 digests, but the 'blake3' package is not installed",
                hint="pip install blake3 (a dependency of trtx-runtime: reinstall it with its dependencies)",
            ) from None

        def _blake3(data: Any) -> str:
            return blake3(data).hexdigest()

        return _blake3
    raise ValueError(f"unknown frame digest {name!r} (expected one of {', '.join(FRAME_DIGESTS)})")
