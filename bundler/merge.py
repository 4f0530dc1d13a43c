"""Fold farm parts into a bundle: check every part and the bundle itself, resolve cache-key conflicts, then commit.

Writing the result, all of it or none of it, and the lock that keeps two merges of one bundle from losing a
part, are in merge_commit.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime_shim.cache_key import key_text as _key_text
from runtime_shim.errors import IntegrityError
from runtime_shim.fsutil import CHUNK, open_regular_file, os_error_hint
from runtime_shim.machine import sm_text
from runtime_shim.manifest import MANIFEST_NAME, CacheKey, Engine, FileRef, Manifest, RuntimeCache, read_manifest_sha256
from runtime_shim.signing import SIGNATURE_NAME, signature_status

from .bundle_io import check_pinned_files, raise_for_problems
from .merge_commit import LOCK_TIMEOUT_S, MergeError, bundle_lock, commit
from .part import Part, base_sha256, read_part

log = logging.getLogger(__name__)

PREFER_POLICIES = ("newest", "oldest")


@dataclass(frozen=True, kw_only=True)
class CacheConflict:
    """Two or more different caches for one key: one kept, the others dropped, and why."""

    key: CacheKey
    kept: str  # where the kept cache came from: "bundle" or a part directory
    kept_sha256: str
    dropped: tuple[tuple[str, str, int | None], ...]  # (source, sha256, created)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key.to_dict(),
            "kept": {"source": self.kept, "sha256": self.kept_sha256},
            "reason": self.reason,
            "dropped": [{"source": s, "sha256": h, "created": c} for s, h, c in self.dropped],
        }


@dataclass(frozen=True, kw_only=True)
class MergeReport:
    bundle: Path
    out: Path
    parts: tuple[str, ...]
    engines_added: tuple[Engine, ...] = ()
    caches_added: tuple[RuntimeCache, ...] = ()
    conflicts: tuple[CacheConflict, ...] = ()
    notes: tuple[str, ...] = field(default=())
    signature_removed: bool = False  # the bundle was signed; the merged manifest is not (sign it again)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "out": str(self.out),
            "parts": list(self.parts),
            "engines_added": [e.to_dict() for e in self.engines_added],
            "caches_added": [c.to_dict() for c in self.caches_added],
            "conflicts": [c.to_dict() for c in self.conflicts],
            "notes": list(self.notes),
            "signature_removed": self.signature_removed,
        }


@dataclass(frozen=True)
class _Candidate:
    cache: RuntimeCache
    source: str  # "bundle" or the part directory as given
    order: int  # 0 = the bundle, then the parts in command-line order (breaks ties in `created`)
    src_dir: Path


def merge_parts(
    bundle_dir: str | os.PathLike[str],
    part_dirs: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None = None,
    prefer: str = "newest",
    progress: Callable[[str], None] | None = None,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> MergeReport:
    """Merge ``part_dirs`` into the bundle (or into a new bundle at ``out``). Raises before touching anything.

    Holds the bundle's merge lock throughout, and reads the bundle only once it holds it: a merge that had to
    wait folds its parts into what the merge before it wrote.
    """
    say = progress or (lambda _m: None)
    bundle = Path(bundle_dir)
    with bundle_lock(bundle.resolve(), required=out is None, say=say, timeout=lock_timeout):
        return _merge(bundle, part_dirs, out=out, prefer=prefer, say=say)


def _merge(
    bundle: Path,
    part_dirs: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None,
    prefer: str,
    say: Callable[[str], None],
) -> MergeReport:
    manifest, warnings, manifest_sha = read_manifest_sha256(bundle)
    base = base_sha256(manifest)
    # In place, the directory itself is exchanged: resolve links so the exchange hits the real bundle.
    target = Path(out) if out is not None else bundle.resolve()
    if out is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise MergeError(
            f"-o {target}: exists and is not an empty directory; merge writes a new bundle there",
            hint="choose a new directory, or merge in place by leaving out -o",
        )
    if out is not None and target.resolve().is_relative_to(bundle.resolve()):
        raise MergeError(
            f"-o {target}: inside the bundle {bundle}; it would become an unlisted file of it",
            hint="choose a directory outside the bundle",
        )
    # Keys a newer trtx-bundler wrote cannot be carried over by this one: say so rather than drop them silently.
    notes: list[str] = [f"{w}; it is not kept in the merged manifest" for w in warnings]
    parts: list[tuple[str, Path, Part]] = []
    seen: set[Path] = set()
    for given in part_dirs:
        path = Path(given)
        if path.resolve() in seen:
            notes.append(f"{given}: given twice; merged once")
            continue
        seen.add(path.resolve())
        part, warnings = read_part(path)
        notes += [f"{path}: {w}" for w in warnings]
        _check_part(path, part, manifest, manifest_sha, base, bundle, notes)
        parts.append((str(given), path, part))
    prefer_source = _prefer_source(prefer, bundle, parts)

    engines = list(manifest.engines)
    engine_src: dict[str, Path] = {}
    added_engines: list[Engine] = []
    for given, path, part in parts:
        e = part.engine
        if e is None or any(x.file.sha256 == e.file.sha256 for x in engines):
            continue
        twins = [
            x
            for x in engines
            if (x.kind, x.platform, tuple(x.compute_capabilities), x.trt_rtx_version)
            == (e.kind, e.platform, tuple(e.compute_capabilities), e.trt_rtx_version)
        ]
        if twins:
            notes.append(
                f"{given}: another {e.kind} engine for SM {_sms(e)} on {e.platform} is already there; both kept "
                f"(each runtime cache names the engine it was made with)"
            )
        engines.append(e)
        engine_src[e.file.sha256] = path
        added_engines.append(e)
    known = {e.file.sha256 for e in engines}
    for given, _path, part in parts:
        missing = [s for s in part.runtime_cache.engines if s not in known]
        if missing:
            raise MergeError(
                f"{given}: its runtime cache was made with engine {missing[0]}, which is neither in the bundle nor in any part given",
                hint="merge the part that built that engine in the same run, or run the farm job again on this bundle",
            )

    caches, conflicts, cache_src = _resolve_caches(manifest, parts, bundle, prefer, prefer_source, notes)
    added_caches = tuple(c for c in caches if c.file.sha256 in cache_src)
    new_manifest = replace(manifest, engines=tuple(engines), runtime_caches=tuple(caches))
    Manifest.from_dict(new_manifest.to_dict(), source="the merged manifest")  # the same checks a reader will make
    # A signature covers manifest.json's bytes: the merged manifest is another one, so the commit leaves it out.
    unsigned = signature_status(bundle).present and not (new_manifest == manifest and out is None)
    report = MergeReport(
        bundle=bundle,
        out=target,
        parts=tuple(g for g, _, _ in parts),
        engines_added=tuple(added_engines),
        caches_added=added_caches,
        conflicts=tuple(conflicts),
        notes=tuple(notes),
        signature_removed=unsigned,
    )
    if new_manifest == manifest and out is None:
        say("nothing new: every engine and cache of these parts is already in the bundle")
        return report
    new_files = {
        ref.path: (engine_src.get(ref.sha256) or cache_src[ref.sha256], ref)
        for _w, ref in new_manifest.files()
        if ref.sha256 in engine_src or ref.sha256 in cache_src
    }
    dropped = {ref.path for _w, ref in manifest.files()} - {ref.path for _w, ref in new_manifest.files()}
    # What is carried forward from the bundle is checked as strictly as what comes from the parts.
    carried = {ref.path for _w, ref in new_manifest.files()} - set(new_files)
    raise_for_problems(
        check_pinned_files(bundle, manifest, only=carried), what=f"{bundle}: cannot merge into a damaged bundle"
    )
    commit(bundle.resolve(), target, new_manifest, new_files, dropped, in_place=out is None, say=say)
    if unsigned:
        log.warning(
            "%s: its signature (%s) does not cover the merged manifest and was %s; sign it again: "
            "trtx-bundle sign %s --key PRIVATE.pem (or --keyless)",
            bundle if out is None else target,
            SIGNATURE_NAME,
            "removed" if out is None else f"not carried over from {bundle}",
            bundle if out is None else target,
        )
    return report


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


def _check_part_limits(path: Path, part: Part) -> None:
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


def _check_part(
    path: Path, part: Part, manifest: Manifest, manifest_sha: str, base: str, bundle: Path, notes: list[str]
) -> None:
    _check_part_limits(path, part)
    if part.bundle_manifest_sha256 != manifest_sha:
        if part.bundle_base_sha256 != base:
            raise MergeError(
                f"{path}: made for another bundle: its part.json names a bundle manifest with sha256 {part.bundle_manifest_sha256} "
                f"(model {part.model!r}), but {bundle / MANIFEST_NAME} has sha256 {manifest_sha} (model {manifest.model.name!r}), "
                "and its model, weights or profiles differ",
                hint="run the farm job on the bundle that this merge job merges into (the build job's artifact)",
            )
        notes.append(
            f"{path}: made for an earlier state of this bundle (same model, weights and profiles; other parts merged since)"
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
    for where, ref in part.files():
        _check_part_file(path / ref.path, ref, f"{path}/part.json {where}")


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


def _prefer_source(prefer: str, bundle: Path, parts: Sequence[tuple[str, Path, Part]]) -> str | None:
    if prefer in PREFER_POLICIES:
        return None
    wanted = Path(prefer).resolve()
    if wanted == bundle.resolve():
        return "bundle"
    for given, path, _part in parts:
        if path.resolve() == wanted:
            return given
    raise MergeError(
        f"--prefer {prefer}: expected newest, oldest, the bundle, or one of the PART_DIRs given ({', '.join(g for g, _, _ in parts)})"
    )


def _resolve_caches(
    manifest: Manifest,
    parts: Sequence[tuple[str, Path, Part]],
    bundle: Path,
    prefer: str,
    prefer_source: str | None,
    notes: list[str],
) -> tuple[list[RuntimeCache], list[CacheConflict], dict[str, Path]]:
    """One cache per key. Identical bytes are one cache; different bytes are a conflict, settled by ``prefer``."""
    candidates = [_Candidate(c, "bundle", 0, bundle) for c in manifest.runtime_caches]
    candidates += [_Candidate(p.runtime_cache, given, i + 1, path) for i, (given, path, p) in enumerate(parts)]
    groups: dict[CacheKey, list[_Candidate]] = {}
    for c in candidates:
        group = groups.setdefault(c.cache.key, [])
        if any(g.cache.file.sha256 == c.cache.file.sha256 for g in group):
            if c.source != "bundle":
                notes.append(
                    f"{c.source}: its runtime cache for {_key_text(c.cache.key)} is already there (same bytes)"
                )
            continue
        group.append(c)
    out: list[RuntimeCache] = []
    conflicts: list[CacheConflict] = []
    sources: dict[str, Path] = {}
    for key, group in groups.items():
        if len(group) == 1:
            winner, reason = group[0], None
        else:
            preferred = [g for g in group if g.source == prefer_source]
            if preferred:
                winner, reason = preferred[0], f"--prefer {prefer}"
            else:
                policy = "oldest" if prefer == "oldest" else "newest"
                pick = min if policy == "oldest" else max
                # Ties in `created` go to the later source for "newest" and the earlier one for "oldest".
                winner = pick(group, key=lambda g: (g.cache.created or 0, g.order if policy == "newest" else -g.order))
                reason = policy + ("" if prefer_source is None else f" (--prefer {prefer} has no cache for this key)")
            conflicts.append(
                CacheConflict(
                    key=key,
                    kept=winner.source,
                    kept_sha256=winner.cache.file.sha256,
                    reason=reason,
                    dropped=tuple((g.source, g.cache.file.sha256, g.cache.created) for g in group if g is not winner),
                )
            )
        out.append(winner.cache)
        if winner.source != "bundle":
            sources[winner.cache.file.sha256] = winner.src_dir
    return out, conflicts, sources


def _sms(engine: Engine) -> str:
    return ", ".join(map(sm_text, engine.compute_capabilities)) or "default"
