"""What the models of one bundle share in its weight store: blobs used by several models and the bytes that saves."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from runtime_shim.manifest import BundleManifest


@dataclass(frozen=True, kw_only=True)
class ModelWeights:
    """One model's part of the store: its tensors and the blobs they use (shared ones included)."""

    name: str
    tensors: int
    blobs: int
    raw_bytes: int  # each of its blobs once
    stored_bytes: int


@dataclass(frozen=True, kw_only=True)
class Sharing:
    """The store as a whole, and what separate bundles (one per model) would have stored again."""

    tensors: int
    blobs: int
    raw_bytes: int  # each blob once
    stored_bytes: int  # the weight file
    shared_blobs: int  # blobs that more than one model uses
    shared_raw_bytes: int
    shared_stored_bytes: int
    saved_raw_bytes: int  # each shared blob's bytes once more per extra model using it
    saved_stored_bytes: int
    models: tuple[ModelWeights, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def store_sharing(bundle: BundleManifest) -> Sharing:
    """Count, per blob of ``bundle``'s store, the models that use it."""
    blobs = bundle.weights.blobs
    stored = [sum(f.size for f in b.frames) for b in blobs]
    users: dict[int, int] = {}
    per_model = []
    for m in bundle.models:
        used = sorted({t.blob for t in m.tensors})
        for b in used:
            users[b] = users.get(b, 0) + 1
        per_model.append(
            ModelWeights(
                name=m.name,
                tensors=len(m.tensors),
                blobs=len(used),
                raw_bytes=sum(blobs[b].nbytes for b in used),
                stored_bytes=sum(stored[b] for b in used),
            )
        )
    shared = [b for b, n in users.items() if n > 1]
    return Sharing(
        tensors=sum(len(m.tensors) for m in bundle.models),
        blobs=len(blobs),
        raw_bytes=sum(b.nbytes for b in blobs),
        stored_bytes=bundle.weights.file.size,
        shared_blobs=len(shared),
        shared_raw_bytes=sum(blobs[b].nbytes for b in shared),
        shared_stored_bytes=sum(stored[b] for b in shared),
        saved_raw_bytes=sum((users[b] - 1) * blobs[b].nbytes for b in shared),
        saved_stored_bytes=sum((users[b] - 1) * stored[b] for b in shared),
        models=tuple(per_model),
    )
