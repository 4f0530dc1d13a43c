"""Schema 1 manifests (one model, frames pinned by sha256), read by rewriting their JSON into schema 2's layout.

Values are moved, not checked: manifest.py's schema 2 parse that follows checks them, so the rules live once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ManifestError
from .schema import kind_name

_CORRUPT_HINT = "the file is corrupt or truncated; fetch the bundle again"


def from_schema_1(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A schema 1 manifest's JSON in schema 2's layout: its one model under ``models``, its tensors with that model,
    its frame ``sha256`` pins as ``digest`` with ``frame_digest`` sha256. Values are moved, not checked: the schema 2
    parse that follows checks them (a value of the wrong type stays where the parse will name it)."""
    out: dict[str, Any] = {"schema_version": 2}  # the layout this rewrites into
    model: dict[str, Any] = {}
    for key, value in data.items():
        if key == "model" and isinstance(value, Mapping):
            model.update(value)
        elif key == "trt_rtx" and isinstance(value, Mapping):
            out["trt_rtx"] = {k: v for k, v in value.items() if k != "parse"}
            if "parse" in value:
                model["parse"] = value["parse"]
        elif key == "weights" and isinstance(value, Mapping):
            weights = {k: v for k, v in value.items() if k != "tensors"}
            weights["frame_digest"] = "sha256"
            if isinstance(weights.get("blobs"), list):
                weights["blobs"] = [_blob_from_schema_1(b) for b in weights["blobs"]]
            if "tensors" in value:
                model["tensors"] = value["tensors"]
            out["weights"] = weights
        elif key in ("inputs", "outputs", "profiles", "warmup_shapes", "skeleton", "engines", "runtime_caches"):
            model[key] = value
        elif key in ("model", "trt_rtx", "weights"):
            raise ManifestError(f"{source}: {key}: expected an object, got {kind_name(value)}", hint=_CORRUPT_HINT)
        elif key != "schema_version":
            out[key] = value  # creator, and keys a newer minor added (warned about by the parse)
    out["models"] = [model]
    return out


def _blob_from_schema_1(blob: Any) -> Any:
    if not isinstance(blob, Mapping) or not isinstance(blob.get("frames"), list):
        return blob
    frames = [
        {("digest" if k == "sha256" else k): v for k, v in f.items()} if isinstance(f, Mapping) else f
        for f in blob["frames"]
    ]
    return {**blob, "frames": frames}
