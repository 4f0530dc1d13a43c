"""`trtx-bundle upgrade`: a bundle's manifest.json rewritten as schema 2 with BLAKE3 frame digests, in place, atomically.

Only manifest.json changes: the weight file keeps its bytes (its frames are re-pinned, not rewritten), every other
file stays as it is. The bundle is verified first (bundle_io.verify_bundle: every pinned file, every frame decoded),
then each frame is read again, its old sha256 checked as it is read and its BLAKE3 digest taken from those very
bytes, so no byte that did not match its old pin is ever pinned anew. The new manifest replaces the old one in one
``os.replace`` at the end; until then the bundle is as it was. A signature (manifest.sig) covers the old manifest's
bytes, so it is taken out first and removed once the new manifest is in place (restored if that fails).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_shim.errors import BundleError, IntegrityError
from runtime_shim.fsutil import atomic_write, disk_errors, sha256_bytes
from runtime_shim.manifest import MANIFEST_NAME, SCHEMA_VERSION, BundleManifest, StoreIndex
from runtime_shim.schema import parse_json, read_json_bytes
from runtime_shim.signing import SIGNATURE_NAME
from runtime_shim.store.digest import DEFAULT_FRAME_DIGEST, digest_function
from runtime_shim.store.reader import WeightReader

from .bundle_io import raise_for_problems, verify_bundle
from .merge_commit import bundle_lock

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (stored bytes re-pinned, stored bytes in all)
READ_BYTES = 16 << 20  # frames that lie back to back are read together, up to this much a read
_HINT_DAMAGED = "fetch the bundle again or rebuild it; upgrade re-pins only bytes that match their old pins"


class UpgradeError(BundleError):
    """The bundle cannot be upgraded as it is (damaged, changed meanwhile, or holding keys an upgrade would drop)."""


@dataclass(frozen=True, kw_only=True)
class UpgradeResult:
    """What ``upgrade_bundle`` did (``upgraded`` False: the bundle was already up to date and nothing was written)."""

    bundle: Path
    upgraded: bool
    schema_before: int
    schema_after: int
    frame_digest_before: str
    frame_digest_after: str
    frames: int  # frames re-pinned (0 when nothing was written)
    stored_bytes: int  # bytes of the weight file they hold
    manifest_sha256_before: str
    manifest_sha256_after: str
    signature_removed: bool  # manifest.sig covered the old manifest and was removed: sign the bundle again

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bundle"] = str(self.bundle)
        return d


def upgrade_bundle(bundle_dir: str | os.PathLike[str], *, progress: Progress | None = None) -> UpgradeResult:
    """Upgrade the bundle directory ``bundle_dir`` to schema 2 with BLAKE3 frame digests (see the module docstring).

    Raises UpgradeError (or the IntegrityError / ManifestError of what is wrong) and leaves the bundle untouched when
    it is damaged, when its manifest holds keys this version does not know (they would be dropped), or when
    manifest.json changes while the frames are hashed.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise UpgradeError(
            f"{root}: not a bundle directory",
            hint="upgrade works on a directory: 'trtx-bundle unpack' an archive, upgrade it, then 'pack' it again",
        )
    with bundle_lock(root.resolve(), required=True, say=log.warning):  # not while a merge rewrites it
        raw = _read_manifest_bytes(root)
        before = _schema_version(raw, root)
        bundle, warnings = BundleManifest.from_json(raw, source=str(root / MANIFEST_NAME))
        sha_before = sha256_bytes(raw)
        unchanged = UpgradeResult(
            bundle=root,
            upgraded=False,
            schema_before=before,
            schema_after=SCHEMA_VERSION,
            frame_digest_before=bundle.weights.frame_digest,
            frame_digest_after=DEFAULT_FRAME_DIGEST,
            frames=0,
            stored_bytes=0,
            manifest_sha256_before=sha_before,
            manifest_sha256_after=sha_before,
            signature_removed=False,
        )
        if before == SCHEMA_VERSION and bundle.weights.frame_digest == DEFAULT_FRAME_DIGEST:
            return unchanged
        if warnings:
            raise UpgradeError(
                f"{root / MANIFEST_NAME}: keys this trtx-bundler does not know, which the upgraded manifest would "
                f"drop: {'; '.join(warnings[:3])}",
                hint="upgrade with the trtx-bundler release that wrote those keys, or rebuild the bundle",
            )
        raise_for_problems(verify_bundle(root), what=f"{root}: cannot upgrade a damaged bundle (nothing was changed)")
        weights = _repin(root, bundle, progress)
        new = dataclasses.replace(bundle, weights=weights).to_json()
        BundleManifest.from_json(new, source="the upgraded manifest")  # the checks every reader will make
        if sha256_bytes(_read_manifest_bytes(root)) != sha_before:
            raise UpgradeError(
                f"{root / MANIFEST_NAME}: changed while the upgrade read the weight file; nothing was written",
                hint="run 'trtx-bundle upgrade' again once nothing else writes the bundle",
            )
        with disk_errors(
            root / MANIFEST_NAME,
            "cannot write the upgraded manifest",
            "the bundle was left as it was",
            error=UpgradeError,
        ):
            removed = _replace_manifest(root, new)
    if removed:
        log.warning(
            "%s: its signature (%s) covered the schema %d manifest and was removed; sign it again: "
            "trtx-bundle sign %s --key PRIVATE.pem (or --keyless)",
            root,
            SIGNATURE_NAME,
            before,
            root,
        )
    return dataclasses.replace(
        unchanged,
        upgraded=True,
        frames=sum(len(b.frames) for b in weights.blobs),
        stored_bytes=weights.file.size,
        manifest_sha256_after=sha256_bytes(new),
        signature_removed=removed,
    )


def _read_manifest_bytes(root: Path) -> bytes:
    return read_json_bytes(
        root / MANIFEST_NAME,
        expected="a bundle directory with manifest.json at its root",
        missing_hint="pass the directory made by 'trtx-bundle build' (or 'unpack' an archive first)",
    )


def _schema_version(raw: bytes, root: Path) -> int:
    """The schema_version as written (parsing rewrites a schema 1 manifest into schema 2's records)."""
    data = parse_json(raw, source=str(root / MANIFEST_NAME), corrupt_hint=_HINT_DAMAGED)
    version = data.get("schema_version") if isinstance(data, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0  # the parse names the problem


def _repin(root: Path, bundle: BundleManifest, progress: Progress | None) -> StoreIndex:
    """The store index with every frame pinned by BLAKE3, from bytes each checked against its old digest as read."""
    index = bundle.weights
    new_digest = digest_function(DEFAULT_FRAME_DIGEST)
    tensors = tuple(t for m in bundle.models for t in m.tensors)  # for messages: the tensors a blob holds
    frames = [(i, j) for i, b in enumerate(index.blobs) for j in range(len(b.frames))]
    digests: dict[tuple[int, int], str] = {}
    done, total = 0, index.file.size
    # verify_frames: read_frames checks each frame's old pin (sha256, or whatever the index says) before we hash it.
    with WeightReader(root, index.with_tensors(tensors), verify_frames=True) as reader:
        buf = bytearray(max([READ_BYTES, *(f.size for b in index.blobs for f in b.frames)]))
        view = memoryview(buf)
        for group in _groups(index, frames):
            metas = [index.blobs[i].frames[j] for i, j in group]
            try:
                reader.read_frames(group, view)
            except IntegrityError as e:
                raise IntegrityError(f"{e} (the upgrade changed nothing)", hint=e.hint or _HINT_DAMAGED) from None
            pos = 0
            for key, f in zip(group, metas):
                digests[key] = new_digest(view[pos : pos + f.size])
                pos += f.size
            done += pos
            if progress is not None:
                progress(done, total)
    blobs = tuple(
        dataclasses.replace(
            b, frames=tuple(dataclasses.replace(f, digest=digests[i, j]) for j, f in enumerate(b.frames))
        )
        for i, b in enumerate(index.blobs)
    )
    return dataclasses.replace(index, frame_digest=DEFAULT_FRAME_DIGEST, blobs=blobs)


def _groups(index: StoreIndex, frames: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Runs of frames in file order (the index keeps them back to back) of up to READ_BYTES each (a larger frame
    alone)."""
    groups: list[list[tuple[int, int]]] = []
    size = 0
    for i, j in frames:
        f = index.blobs[i].frames[j]
        if not groups or size + f.size > READ_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((i, j))
        size += f.size
    return groups


def _replace_manifest(root: Path, new: bytes) -> bool:
    """Put ``new`` in place as manifest.json; a signature of the old one goes first (never a stale signature beside
    a new manifest) and comes back if the replace fails. Returns whether a signature was removed."""
    signature = root / SIGNATURE_NAME
    set_aside = root / f".{SIGNATURE_NAME}.upgrade-{uuid.uuid4().hex[:12]}"
    signed = os.path.lexists(signature)
    try:
        if signed:
            os.replace(signature, set_aside)
        atomic_write(root / MANIFEST_NAME, new)
    except BaseException:
        if signed and os.path.lexists(set_aside):
            os.replace(set_aside, signature)  # the old manifest stays, so its signature does too
        raise
    if signed:
        try:
            os.unlink(set_aside)
        except OSError as e:  # the new manifest is in place; a leftover hidden file is only untidy
            log.warning("%s: could not remove the old signature set aside there (%s)", set_aside, e.strerror or e)
    return signed
