"""What `inspect` shows: a bundle's models (I/O, profiles, engines, caches, coverage) and the weight bytes they share.

The summary has the bundle-wide keys (target, the weight file, creator), a ``models`` list with one entry per model
and a ``shared`` object. For a one-model bundle, or with ``model=``, that model's entry is also spread over the top
level, as a single-model bundle always showed it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runtime_shim.manifest import BundleManifest, Manifest, read_bundle_manifest
from runtime_shim.store.format import MAGIC

from .coverage import coverage
from .store_sharing import store_sharing


def describe_bundle(bundle_dir: str | os.PathLike[str], *, model: str | None = None) -> dict[str, Any]:
    """The summary of a bundle directory or archive (an archive's manifest is read in place, nothing extracted).

    ``model`` narrows it to that model (ModelChoiceError listing the names where there is none of that name).
    """
    root = Path(bundle_dir)
    if root.is_file():
        from runtime_shim.archive import read_archive_bundle

        bundle, warnings, _raw = read_archive_bundle(root)
    else:
        bundle, warnings, _sha = read_bundle_manifest(root)
    views = [bundle.view(model, source=str(root))] if model is not None else bundle.views()
    users = _blob_users(bundle)
    entries = [_model_entry(v, users) for v in views]
    out: dict[str, Any] = {"bundle": str(root), "schema_version": bundle.schema_version}
    if len(entries) == 1:  # one model's keys at the top level, where a single-model bundle always had them
        out.update({k: _store_summary(bundle) if k == "weights" else v for k, v in entries[0].items()})
    else:
        out["trt_rtx"] = bundle.trt_rtx.to_dict()
        out["weights"] = _store_summary(bundle)
    out["creator"] = bundle.creator.to_dict()
    out["warnings"] = warnings
    out["models"] = entries
    out["shared"] = shared_bytes(bundle, users)
    return out


def _blob_users(bundle: BundleManifest) -> dict[int, list[int]]:
    """Blob index -> the indices of the models whose tensors use it."""
    users: dict[int, list[int]] = {}
    for i, m in enumerate(bundle.models):
        for b in sorted({t.blob for t in m.tensors}):
            users.setdefault(b, []).append(i)
    return users


def _model_entry(view: Manifest, users: dict[int, list[int]]) -> dict[str, Any]:
    """One model: what a single-model bundle's summary showed of it, and its part of the shared weight store."""
    return {
        "model": view.model.to_dict(),
        "trt_rtx": {k: v for k, v in view.trt_rtx.to_dict().items() if k != "parse" or v is not None},
        "inputs": [t.to_dict() for t in view.inputs],
        "outputs": [t.to_dict() for t in view.outputs],
        "profiles": [p.to_dict() for p in view.profiles],
        "warmup_shapes": [{k: list(v) for k, v in s.items()} for s in view.warmup_shapes],
        "weights": _model_weights(view, users),
        "skeleton": view.skeleton.to_dict(),
        "engines": [e.to_dict() for e in view.engines],
        "runtime_caches": [c.to_dict() for c in view.runtime_caches],
        "coverage": coverage(view).to_dict(),  # per platform x SM: engine a user gets, GPUs with a cache
    }


def _store_summary(bundle: BundleManifest) -> dict[str, Any]:
    """The weight file: its blobs once, and ``tensors`` / ``tensor_bytes`` counted over every model's tensors."""
    w = bundle.weights
    raw = sum(b.nbytes for b in w.blobs)
    encodings: dict[str, int] = {}
    for b in w.blobs:
        encodings[b.encoding] = encodings.get(b.encoding, 0) + 1
    return {
        "file": w.file.path,
        "tensors": sum(len(m.tensors) for m in bundle.models),
        "blobs": len(w.blobs),
        "tensor_bytes": sum(w.blobs[t.blob].nbytes for m in bundle.models for t in m.tensors),  # before dedup
        "raw_bytes": raw,
        "stored_bytes": w.file.size,
        "ratio": round(raw / w.file.size, 3) if w.file.size else None,
        "encodings": dict(sorted(encodings.items())),
    }


def _model_weights(view: Manifest, users: dict[int, list[int]]) -> dict[str, Any]:
    """One model's part of the store: its tensors, the blobs they use, and how many of those other models use too."""
    blobs = view.weights.blobs
    used = sorted({t.blob for t in view.weights.tensors})
    return {
        "tensors": len(view.weights.tensors),
        "blobs": len(used),
        "tensor_bytes": sum(blobs[t.blob].nbytes for t in view.weights.tensors),
        "raw_bytes": sum(blobs[b].nbytes for b in used),
        "stored_bytes": sum(f.size for b in used for f in blobs[b].frames),
        "shared_blobs": sum(1 for b in used if len(users[b]) > 1),
    }


def shared_bytes(bundle: BundleManifest, users: dict[int, list[int]] | None = None) -> dict[str, Any]:
    """The blobs and files several models use, and what separate bundles (one per model) would have stored.

    A separate bundle's weight file would hold its model's blobs (the same frames) after the store's magic:
    ``separate_stored_bytes`` is that size summed over the models; ``saved_stored_bytes`` what sharing saves.
    """
    s = store_sharing(bundle)
    separate = sum(len(MAGIC) + m.stored_bytes for m in s.models)
    groups: dict[tuple[int, ...], list[int]] = {}  # the models using a blob (several) -> those blobs
    for b, who in (users if users is not None else _blob_users(bundle)).items():
        if len(who) > 1:
            groups.setdefault(tuple(who), []).append(b)
    blobs = bundle.weights.blobs
    by_models: list[dict[str, Any]] = [
        {
            "models": [bundle.models[i].name for i in who],
            "blobs": len(bs),
            "raw_bytes": sum(blobs[b].nbytes for b in bs),
            "stored_bytes": sum(f.size for b in bs for f in blobs[b].frames),
        }
        for who, bs in groups.items()
    ]
    by_models.sort(key=lambda g: (-g["stored_bytes"], g["models"]))
    return {
        "models": len(bundle.models),
        "blobs": s.shared_blobs,
        "raw_bytes": s.shared_raw_bytes,
        "stored_bytes": s.shared_stored_bytes,
        "bundle_stored_bytes": bundle.weights.file.size,
        "separate_stored_bytes": separate,
        "saved_stored_bytes": separate - bundle.weights.file.size,
        "by_models": by_models,
        "files": _shared_files(bundle),
    }


def _shared_files(bundle: BundleManifest) -> list[dict[str, Any]]:
    """Files pinned by several models (an identical skeleton, say), each with the models that pin it."""
    pinned: dict[str, list[str]] = {}
    for m in bundle.models:
        for ref in (m.skeleton.file, *(e.file for e in m.engines), *(c.file for c in m.runtime_caches)):
            names = pinned.setdefault(ref.path, [])
            if not names or names[-1] != m.name:
                names.append(m.name)
    return [{"path": p, "models": names} for p, names in sorted(pinned.items()) if len(names) > 1]
