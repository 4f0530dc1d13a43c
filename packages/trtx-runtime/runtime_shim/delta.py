"""Applying an update (.trtxd) to a bundle: NEW rebuilt beside OLD, every byte checked, then swapped in at once.

``apply_update`` checks the update against the bundle and against the NEW manifest it carries before writing a byte
(the right OLD, every file NEW pins accounted for, declared sizes equal to NEW's pins, a weight recipe whose every
copy lands on a frame of OLD's weight file), then builds NEW in a temp directory beside the target: files NEW shares
with OLD hard-linked (in place: the old directory goes away, so nothing can change them behind NEW's back) or
copied (``out``: the two bundles stay independent), whole files from the update, the weight file reassembled frame
by frame with each frame's digest checked as it is written. Every file's sha256 and size is checked against NEW's
manifest. Then one rename (``out``) or one atomic directory exchange (in place); a failure or a kill before that
leaves the bundle exactly as it was (docs/DELTA.md, "Apply").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from .delta_commit import checked, commit, create, lock_for, reuse
from .delta_format import LITERALS, MAX_MANIFEST_BYTES, NOT_A_DELTA, DeltaFile, frame_hasher, read_delta
from .errors import BundleError, DeltaError, IntegrityError, ManifestError, SignatureError
from .fsutil import CHUNK, disk_errors, open_regular_file
from .manifest import MANIFEST_NAME, BundleManifest, FileRef, read_bundle_manifest
from .signing import MAX_SIGNATURE_BYTES, SIGNATURE_NAME, TrustedKey
from .store.format import MAGIC

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, bytes done, bytes in all)


@dataclass(frozen=True, kw_only=True)
class AppliedUpdate:
    """What ``apply_update`` did."""

    bundle: str  # where NEW now is
    in_place: bool
    old_manifest_sha256: str
    new_manifest_sha256: str
    files: int  # files NEW pins
    reused: int  # of them, taken from OLD whole
    carried: int  # of them, carried whole by the update
    reuse: str  # "hard link" (in place) | "copy" (out)
    weight_bytes_from_old: int  # of NEW's weight file, copied from OLD's
    weight_bytes_from_update: int
    signed: bool  # NEW carries manifest.sig

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Unit:
    """One piece of NEW's weight file: the magic or one frame, and where its bytes come from."""

    source: str  # "old" | "delta"
    old_offset: int  # in OLD's weight file ("old" only)
    size: int
    digest: str | None  # the frame's pinned digest; None for the magic (checked against MAGIC)
    where: str  # key path in NEW's manifest, for messages


@dataclass
class _Plan:
    delta: DeltaFile
    old_dir: Path
    old: BundleManifest
    new: BundleManifest
    new_raw: bytes
    signature: bytes | None
    reuse: dict[str, Path]  # NEW's path -> OLD's file with that content
    carry: dict[str, FileRef]
    units: list[_Unit]


def apply_update(
    bundle_dir: str | os.PathLike[str],
    delta_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    trusted_keys: TrustedKey | Sequence[TrustedKey] | None = None,
    progress: Progress | None = None,
) -> AppliedUpdate:
    """Turn the bundle at ``bundle_dir`` (OLD) into the NEW that ``delta_path`` was made for, atomically.

    In place by default (OLD is replaced only once NEW is whole and verified); with ``out``, NEW goes to that new (or
    empty) directory and OLD is left untouched. Raises DeltaError for an update that is damaged, hostile or made for
    another bundle, IntegrityError where OLD's own files are damaged, BundleError (and kin) otherwise; in every case
    the bundle is left as it was. With ``trusted_keys`` (PEM public keys, as for ``load``), NEW must carry a signature
    by one of them over its manifest.json, checked before anything is written (SignatureError otherwise).
    """
    bundle = Path(os.path.abspath(bundle_dir))
    out_dir = None if out is None else Path(os.path.abspath(out))
    in_place = out_dir is None or out_dir == bundle
    if in_place:
        bundle = bundle.resolve()
    target = out_dir if out_dir is not None and not in_place else bundle
    if bundle.is_file():
        raise BundleError(
            f"{bundle}: a file; apply updates a bundle directory",
            hint="unpack the archive first (trtx-bundle unpack FILE -o DIR), then apply the update to DIR",
        )
    delta = read_delta(delta_path)
    for w in delta.warnings:
        log.warning("%s: %s", delta.path, w)
    if not in_place:
        with disk_errors(target, "cannot look at the target", "nothing was written"):
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise BundleError(
                    f"{target}: exists and is not an empty directory; apply -o writes a new directory",
                    hint="choose a new directory, or leave -o out to update the bundle in place",
                )
    with lock_for(bundle, required=in_place):
        plan = _plan(delta, bundle)
        if trusted_keys is not None:
            _check_signed(plan, trusted_keys)
        kept = "the bundle was left as it was" if in_place else "nothing was written"
        commit(
            bundle,
            target,
            plan.old,
            plan.new,
            in_place=in_place,
            kept=kept,
            space=_space_needed(plan, in_place),
            build=lambda stage: _build(plan, stage, link=in_place, progress=progress or _quiet),
        )
    reused = len(plan.reuse)
    literal = sum(u.size for u in plan.units if u.source == "delta")
    return AppliedUpdate(
        bundle=str(target),
        in_place=in_place,
        old_manifest_sha256=delta.header.old_manifest_sha256,
        new_manifest_sha256=delta.header.new_manifest_sha256,
        files=len(plan.new.files()),
        reused=reused,
        carried=len(plan.carry),
        reuse="hard link" if in_place else "copy",
        weight_bytes_from_old=sum(u.size for u in plan.units if u.source == "old"),
        weight_bytes_from_update=literal,
        signed=plan.signature is not None,
    )


def _quiet(what: str, done: int, total: int) -> None:
    pass


# --------------------------------------------------------------------------- checks before any write
def _plan(delta: DeltaFile, bundle: Path) -> _Plan:
    header = delta.header
    old, _warnings, old_sha = read_bundle_manifest(bundle)
    if old_sha != header.old_manifest_sha256:
        if old_sha == header.new_manifest_sha256:
            raise DeltaError(
                f"{delta.path}: {bundle} is already the bundle this update makes (manifest.json sha256 {old_sha})",
                hint="nothing to do: the update was applied before",
            )
        raise DeltaError(
            f"{delta.path}: made for the bundle whose manifest.json has sha256 {header.old_manifest_sha256}, but "
            f"{bundle}/manifest.json has sha256 {old_sha}",
            hint="apply it to the bundle it was made from (trtx-bundle diff OLD NEW), or fetch the whole new bundle",
        )
    with delta.open() as f:
        new_raw = delta.read_small(f, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        signature = delta.read_small(f, SIGNATURE_NAME, MAX_SIGNATURE_BYTES) if delta.section(SIGNATURE_NAME) else None
    if (got := hashlib.sha256(new_raw).hexdigest()) != header.new_manifest_sha256:
        raise DeltaError(
            f"{delta.path}: its manifest.json has sha256 {got}, but its header names {header.new_manifest_sha256}: "
            "the parts of two different updates, or damaged",
            hint=NOT_A_DELTA,
        )
    try:
        new, _ = BundleManifest.from_json(new_raw, source=f"{delta.path}: manifest.json")
    except ManifestError as e:
        raise DeltaError(str(e), hint=e.hint or NOT_A_DELTA) from None
    old_by_sha = {ref.sha256: bundle / ref.path for _key, ref in old.files()}
    sizes = {ref.sha256: ref.size for _key, ref in old.files()}
    reuse: dict[str, Path] = {}
    carry: dict[str, FileRef] = {}
    sections = {s.name for s in header.sections} - {MANIFEST_NAME, SIGNATURE_NAME, LITERALS}
    recipe = header.weights
    for key, ref in new.files():
        if ref.path in sections:
            carry[ref.path] = ref
        elif recipe is not None and key == "weights.file":
            pass
        elif sizes.get(ref.sha256) == ref.size:
            reuse[ref.path] = old_by_sha[ref.sha256]
        else:
            raise DeltaError(
                f"{delta.path}: NEW pins {ref.path} ({key}), which neither the update nor {bundle} holds",
                hint="the update was made for another bundle: make it again with trtx-bundle diff OLD NEW",
            )
    if stray := sorted(sections - set(carry)):
        raise DeltaError(
            f"{delta.path}: section {stray[0]!r} is not a file that NEW's manifest pins",
            hint=NOT_A_DELTA,
        )
    if recipe is not None and new.weights.file.path in carry:
        raise DeltaError(
            f"{delta.path}: carries {new.weights.file.path} twice: whole and as a recipe", hint=NOT_A_DELTA
        )
    units = _weight_units(delta, bundle, old, new) if recipe is not None else []
    return _Plan(delta, bundle, old, new, new_raw, signature, reuse, carry, units)


def _check_signed(plan: _Plan, trusted_keys: TrustedKey | Sequence[TrustedKey]) -> None:
    from .signing import verify_signature

    keys = [trusted_keys] if isinstance(trusted_keys, (str, bytes, bytearray, os.PathLike)) else list(trusted_keys)
    where = f"{plan.delta.path}: the bundle it makes"
    if plan.signature is None:
        raise SignatureError(
            f"{where} is not signed (the update carries no {SIGNATURE_NAME}), but a signature by a trusted key was "
            "required",
            hint="fetch the publisher's signed update (trtx-bundle sign NEW, then diff OLD NEW)",
        )
    verify_signature(plan.new_raw, plan.signature, keys, where=where)


def _weight_units(delta: DeltaFile, bundle: Path, old: BundleManifest, new: BundleManifest) -> list[_Unit]:
    """NEW's weight file as (source, size, digest) per frame, every copy checked against OLD's index."""
    recipe = delta.header.weights
    assert recipe is not None
    src = f"{delta.path}: header weights"
    if recipe.file != new.weights.file:
        raise DeltaError(f"{src}.file: {recipe.file.path}, but NEW's manifest pins {new.weights.file.path}")
    if recipe.source != old.weights.file:
        raise DeltaError(
            f"{src}.source: copies from {recipe.source.path}, but {bundle}'s weight file is {old.weights.file.path}",
            hint="the update was made for another bundle",
        )
    same_digest = old.weights.frame_digest == new.weights.frame_digest
    old_frames: dict[int, tuple[int, str | None]] = {0: (len(MAGIC), None)}
    old_frames.update({f.offset: (f.size, f.digest) for b in old.weights.blobs for f in b.frames})
    pieces: list[tuple[int, str | None, str]] = [(len(MAGIC), None, "weights (magic)")]
    pieces += [
        (f.size, f.digest, f"weights.blobs[{i}].frames[{j}]")
        for i, b in enumerate(new.weights.blobs)
        for j, f in enumerate(b.frames)
    ]
    units: list[_Unit] = []
    ops = iter(enumerate(recipe.ops))
    k, op, used = -1, None, 0
    for size, digest, where in pieces:
        if op is None or used == op.size:
            k, op = next(ops, (len(recipe.ops), None))
            used = 0
            if op is None:
                raise DeltaError(f"{src}.ops: end before NEW's {where}", hint=NOT_A_DELTA)
        if op.size - used < size:
            raise DeltaError(f"{src}.ops[{k}]: ends inside NEW's {where} ({size} bytes)", hint=NOT_A_DELTA)
        offset = 0
        if op.source == "old":
            offset = (op.offset or 0) + used
            got = old_frames.get(offset)
            if got is None or got[0] != size or (same_digest and got[1] != digest):
                raise DeltaError(
                    f"{src}.ops[{k}]: copies {size} bytes from offset {offset} of {bundle}'s weight file for NEW's "
                    f"{where}, but no frame of OLD's with that size and digest starts there"
                    + (f" (the file is {old.weights.file.size} bytes)" if offset >= old.weights.file.size else ""),
                    hint=NOT_A_DELTA,
                )
        units.append(_Unit(op.source, offset, size, digest, where))
        used += size
    if op is None or used != op.size or next(ops, None) is not None:
        raise DeltaError(
            f"{src}.ops: write more than NEW's {new.weights.file.size}-byte weight file ({src}.file.size)",
            hint=NOT_A_DELTA,
        )
    return units


def _space_needed(plan: _Plan, in_place: bool) -> int:
    written = sum(ref.size for ref in plan.carry.values()) + len(plan.new_raw)
    if plan.units:
        written += plan.new.weights.file.size
    if not in_place:
        written += sum(os.path.getsize(p) for p in plan.reuse.values() if p.exists())
    return written


# --------------------------------------------------------------------------- building NEW in the stage
def _build(plan: _Plan, stage: Path, *, link: bool, progress: Progress) -> None:
    new = plan.new
    total = sum(ref.size for _k, ref in new.files())
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress("apply", done, total)

    with plan.delta.open() as f:
        for key, ref in new.files():
            dest = stage / ref.path
            if ref.path in plan.reuse:
                reuse(plan.reuse[ref.path], dest, ref, key, link=link, advance=advance)
            elif ref.path in plan.carry:
                reader = plan.delta.reader(f, ref.path, ref.size)
                with create(dest) as out, checked(dest, ref, key, plan.delta.path) as h:
                    while chunk := reader.read(CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        advance(len(chunk))
                    reader.finish()
            else:
                _assemble(plan, f, dest, ref, advance)
    with create(stage / MANIFEST_NAME) as out:
        out.write(plan.new_raw)
    if plan.signature is not None:
        with create(stage / SIGNATURE_NAME) as out:
            out.write(plan.signature)


def _assemble(plan: _Plan, f: BinaryIO, dest: Path, ref: FileRef, advance: Callable[[int], None]) -> None:
    """NEW's weight file from OLD's frames and the literals, each frame's digest checked as it is written."""
    literal_size = sum(u.size for u in plan.units if u.source == "delta")
    literals = plan.delta.reader(f, LITERALS, literal_size) if literal_size else None
    old_path = plan.old_dir / plan.old.weights.file.path
    name = plan.new.weights.frame_digest
    old_f: IO[bytes] | None = None
    with contextlib.ExitStack() as stack:
        if any(u.source == "old" for u in plan.units):
            old_f, _size = open_regular_file(old_path, "the bundle's weight file", error=IntegrityError)
            stack.enter_context(old_f)
        out = stack.enter_context(create(dest))
        h = stack.enter_context(checked(dest, ref, "weights.file", plan.delta.path))
        for u in plan.units:
            fh = frame_hasher(name)
            magic = b""
            if u.source == "old":
                assert old_f is not None
                old_f.seek(u.old_offset)
            left = u.size
            while left:
                if u.source == "old":
                    assert old_f is not None
                    chunk = old_f.read(min(CHUNK, left))
                    if not chunk:
                        raise IntegrityError(f"{old_path}: ends inside the frame copied for NEW's {u.where}")
                else:
                    assert literals is not None
                    chunk = literals.read_exact(min(CHUNK, left))
                left -= len(chunk)
                fh.update(chunk)
                h.update(chunk)
                out.write(chunk)
                if u.digest is None:
                    magic += chunk
                advance(len(chunk))
            if (u.digest is None and magic != MAGIC) or (u.digest is not None and fh.hexdigest() != u.digest):
                got = repr(magic) if u.digest is None else f"{name} {fh.hexdigest()}"
                expected = repr(MAGIC) if u.digest is None else u.digest
                if u.source == "delta":
                    raise DeltaError(
                        f"{plan.delta.path}: the literal bytes for NEW's {u.where} are {got}, expected {expected}: "
                        "damaged or tampered with",
                        hint=NOT_A_DELTA,
                    )
                raise IntegrityError(
                    f"{old_path}: the frame at offset {u.old_offset} ({u.size} bytes), copied for NEW's {u.where}, is "
                    f"{got}, expected {expected}: the bundle's weight file is damaged",
                    hint="run 'trtx-bundle verify' on the bundle; fetch the whole new bundle instead of the update",
                )
        if literals is not None:
            literals.finish()


__all__ = ["AppliedUpdate", "apply_update"]
