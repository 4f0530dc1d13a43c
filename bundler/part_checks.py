"""What merge checks of each farm part before anything is written: its limits, its bundle and model, its TRT-RTX
version, and the size and sha256 of every file it pins."""

from __future__ import annotations

import hashlib
from pathlib import Path

from runtime_shim.errors import IntegrityError
from runtime_shim.fsutil import CHUNK, open_regular_file, os_error_hint
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest, FileRef, Manifest

from .merge_commit import MergeError
from .part import Part, base_sha256

# Caps on what a part may declare beyond its schema's types: values no real GPU, driver, file or clock has are
# refused before merge writes them into the bundle's manifest, and from there onto every user's machine.
_MAX_FILE_BYTES = 1 << 44  # 16 TiB
_MAX_UNIX_TIME = 253_402_300_799  # 9999-12-31
_MAX_SM = 9999
_MAX_TEXT = 256


def _part_limits(part: Part) -> list[tuple[str, int | str | None, int | str]]:
    """(key path, value, limit) for every bounded field of the part; a limit is a number or 'text'."""
    key = part.runtime_cache.key
    out: list[tuple[str, int | str | None, int | str]] = [
        ("runtime_cache.key.pci_device_id", key.pci_device_id, 0xFFFF),
        ("runtime_cache.key.sm", key.sm, _MAX_SM),
        ("runtime_cache.key.driver_version", key.driver_version, "text"),
        ("runtime_cache.key.gpu_name", key.gpu_name, "text"),
        ("runtime_cache.created", part.runtime_cache.created, _MAX_UNIX_TIME),
        ("created", part.created, _MAX_UNIX_TIME),
    ]
    out += [(f"{where}.size", ref.size, _MAX_FILE_BYTES) for where, ref in part.files()]
    if part.engine is not None:
        out += [
            (f"engine.compute_capabilities[{i}]", sm, _MAX_SM) for i, sm in enumerate(part.engine.compute_capabilities)
        ]
    return out


def check_part_limits(path: Path, part: Part) -> None:
    for where, value, limit in _part_limits(part):
        if isinstance(value, str) and limit == "text" and len(value) > _MAX_TEXT:
            raise MergeError(
                f"{path}/part.json: {where} is {len(value)} characters ({value[:20]}...); expected at most {_MAX_TEXT}",
                hint="the part was not written by 'trtx-bundle farm-job', or it was tampered with: do not merge it",
            )
        if isinstance(value, int) and isinstance(limit, int) and value > limit:
            shown = str(value) if value < 10**30 else f"a {len(str(value))}-digit number"
            raise MergeError(
                f"{path}/part.json: {where} is {shown}; expected at most {limit}",
                hint="the part was not written by 'trtx-bundle farm-job', or it was tampered with: do not merge it",
            )


def check_part(
    path: Path, part: Part, bundle: BundleManifest, manifest_sha: str, bundle_dir: Path, notes: list[str]
) -> Manifest:
    """Check one part against the bundle; returns the view of the model it is for. Raises MergeError or
    IntegrityError naming the part; ``notes`` gets what is fine but worth saying."""
    check_part_limits(path, part)
    manifest_path = bundle_dir / MANIFEST_NAME
    if part.model not in bundle.names:
        names = ", ".join(repr(n) for n in bundle.names)
        raise MergeError(
            f"{path}: made for another bundle: its part.json is for model {part.model!r}, but {manifest_path} holds no model "
            f"of that name (its model{'s' if len(bundle.names) > 1 else ''}: {names})",
            hint="run the farm job on the bundle that this merge job merges into (the build job's artifact)",
        )
    manifest = bundle.view(part.model, source=str(manifest_path))
    if part.bundle_manifest_sha256 != manifest_sha:
        if part.bundle_base_sha256 != base_sha256(manifest):
            raise MergeError(
                f"{path}: made for another bundle: its part.json names a bundle manifest with sha256 {part.bundle_manifest_sha256} "
                f"(model {part.model!r}), but {manifest_path} has sha256 {manifest_sha}, and its model {part.model!r}, "
                "the weights or the profiles differ",
                hint="run the farm job on the bundle that this merge job merges into (the build job's artifact)",
            )
        notes.append(
            f"{path}: made for an earlier state of this bundle (same model {part.model!r}, weights and profiles; "
            "other parts merged since)"
        )
    want = manifest.trt_rtx
    key = part.runtime_cache.key
    for where, version in (
        ("runtime_cache.key.trt_rtx_version", key.trt_rtx_version),
        ("engine.trt_rtx_version", part.engine.trt_rtx_version if part.engine else want.version),
    ):
        if version != want.version:
            raise MergeError(
                f"{path}/part.json: {where} is {version}, but the bundle is for TensorRT for RTX {want.version}; "
                "engines and caches work only with the exact version that made them",
                hint=f"install tensorrt-rtx=={want.version} on that farm runner and run its job again",
            )
    if key.cuda_flavour != want.cuda_flavour:
        raise MergeError(
            f"{path}/part.json: runtime_cache.key.cuda_flavour is {key.cuda_flavour}, but the bundle's TRT-RTX is {want.cuda_flavour}",
            hint=f"install the {want.cuda_flavour} build of tensorrt-rtx on that farm runner and run its job again",
        )
    for key_path, ref in part.files():
        _check_part_file(path / ref.path, ref, f"{path}/part.json {key_path}")
    return manifest


def _check_part_file(file: Path, ref: FileRef, pinned_by: str) -> None:
    """Type and size before a byte is hashed: a FIFO would hang the read, a huge sparse file take minutes."""
    try:
        f, size = open_regular_file(file, f"a file of {ref.size} bytes (pinned by {pinned_by})", error=IntegrityError)
    except FileNotFoundError:
        raise IntegrityError(
            f"{file}: missing (pinned by {pinned_by})",
            hint="the part was copied incompletely; download the artifact again or rerun the farm job",
        ) from None
    hint = "the part was changed or truncated after the farm job wrote it; do not merge it, run the job again"
    with f:
        if size != ref.size:
            raise IntegrityError(f"{file}: {size} bytes, but {pinned_by} pins {ref.size} bytes", hint=hint)
        h = hashlib.sha256()
        try:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        except OSError as e:
            raise IntegrityError(f"{file}: cannot read ({e.strerror or e})", hint=os_error_hint(e)) from None
    if h.hexdigest() != ref.sha256:
        raise IntegrityError(f"{file}: sha256 {h.hexdigest()}, but {pinned_by} pins {ref.sha256}", hint=hint)
