"""Fold farm parts into a bundle: check every part, resolve cache-key conflicts, and commit all of it or none of it.

The new bundle is assembled in a temp directory beside the target (existing files hard-linked, part files
copied while their sha256 is checked), then committed with one rename: to ``-o OUT``, or, in place, by
atomically exchanging it with the bundle directory (Linux ``renameat2(RENAME_EXCHANGE)``). A crash before
that point leaves the bundle exactly as it was. Where no atomic exchange exists (Windows, some file systems)
the new files are moved in and manifest.json is replaced last: a crash then leaves the old manifest with
every file it pins intact, but possibly unlisted files that ``verify`` reports as extra.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime_shim.cache_key import key_text as _key_text
from runtime_shim.errors import BundleError, IntegrityError
from runtime_shim.fsutil import CHUNK, atomic_write, atomic_writer, sha256_file
from runtime_shim.machine import sm_text
from runtime_shim.manifest import MANIFEST_NAME, CacheKey, Engine, FileRef, Manifest, RuntimeCache, read_manifest_sha256

from .part import Part, base_sha256, read_part

log = logging.getLogger(__name__)

PREFER_POLICIES = ("newest", "oldest")


class MergeError(BundleError):
    """A part does not belong in this bundle (another bundle, another TRT-RTX version) or cannot be merged."""


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "out": str(self.out),
            "parts": list(self.parts),
            "engines_added": [e.to_dict() for e in self.engines_added],
            "caches_added": [c.to_dict() for c in self.caches_added],
            "conflicts": [c.to_dict() for c in self.conflicts],
            "notes": list(self.notes),
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
) -> MergeReport:
    """Merge ``part_dirs`` into the bundle (or into a new bundle at ``out``). Raises before touching anything."""
    say = progress or (lambda _m: None)
    bundle = Path(bundle_dir)
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
    report = MergeReport(
        bundle=bundle,
        out=target,
        parts=tuple(g for g, _, _ in parts),
        engines_added=tuple(added_engines),
        caches_added=added_caches,
        conflicts=tuple(conflicts),
        notes=tuple(notes),
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
    _commit(bundle.resolve(), target, new_manifest, new_files, dropped, in_place=out is None, say=say)
    return report


def _check_part(
    path: Path, part: Part, manifest: Manifest, manifest_sha: str, base: str, bundle: Path, notes: list[str]
) -> None:
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
        file = path / ref.path
        try:
            sha, size = sha256_file(file)
        except FileNotFoundError:
            raise IntegrityError(
                f"{file}: missing (pinned by {path}/part.json {where})",
                hint="the part was copied incompletely; download the artifact again or rerun the farm job",
            ) from None
        if (sha, size) != (ref.sha256, ref.size):
            raise IntegrityError(
                f"{file}: sha256 {sha} ({size} bytes), but {path}/part.json {where} pins {ref.sha256} ({ref.size} bytes)",
                hint="the part was changed or truncated after the farm job wrote it; do not merge it, run the job again",
            )


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


# --------------------------------------------------------------------------- commit
def _commit(
    bundle: Path,
    target: Path,
    manifest: Manifest,
    new_files: dict[str, tuple[Path, FileRef]],
    dropped: set[str],
    *,
    in_place: bool,
    say: Callable[[str], None],
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    stage: Path | None = Path(tempfile.mkdtemp(prefix=f".{target.name}.merge-", dir=target.parent))
    try:
        os.chmod(stage, bundle.stat().st_mode & 0o7777)  # mkdtemp makes 0700; the bundle keeps its own mode
        for _where, ref in manifest.files():
            dest = stage / ref.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            if ref.path in new_files:
                src_dir, _ = new_files[ref.path]
                _copy_verified(src_dir / ref.path, dest, ref)
            elif not dest.exists():
                _link_or_copy(bundle / ref.path, dest)
        atomic_write(stage / MANIFEST_NAME, manifest.to_json())
        if not in_place:
            if target.exists():
                target.rmdir()  # empty (checked before): os.rename cannot replace a directory on Windows
            os.rename(stage, target)
            stage = None
            say(f"merged bundle written to {target}")
            return
        if _exchange(stage, bundle):
            say(f"bundle {bundle} updated (atomic directory exchange)")
            return  # `stage` now holds the old bundle; removed below
        _move_in(stage, bundle, manifest, new_files, dropped)
        say(f"bundle {bundle} updated (files moved in, manifest replaced last)")
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _copy_verified(src: Path, dest: Path, ref: FileRef) -> None:
    """Copy and hash in one pass: what lands in the bundle is exactly what part.json pins, or nothing."""
    import hashlib

    h, size = hashlib.sha256(), 0
    with open(src, "rb") as f, atomic_writer(dest) as out:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
        if (h.hexdigest(), size) != (ref.sha256, ref.size):
            raise IntegrityError(
                f"{src}: changed while merging: sha256 {h.hexdigest()} ({size} bytes), expected {ref.sha256} ({ref.size} bytes)",
                hint="something is writing to the part directory; merge again once it is done",
            )


def _link_or_copy(src: Path, dest: Path) -> None:
    # Hard links are safe: nothing in a bundle is ever written in place, only replaced.
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE). False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False  # glibc < 2.28, or a libc without it
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    log.debug("renameat2(RENAME_EXCHANGE) failed: %s; falling back to moving files in", os.strerror(err))
    return False


def _move_in(
    stage: Path, bundle: Path, manifest: Manifest, new_files: dict[str, tuple[Path, FileRef]], dropped: set[str]
) -> None:
    """Move the new files into the bundle, then replace manifest.json; on an error, take the moved files out again."""
    placed: list[Path] = []
    try:
        for rel in sorted(new_files):
            dest = bundle / rel
            if dest.exists():
                continue  # same name, same content
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dest)
            placed.append(dest)
        atomic_write(bundle / MANIFEST_NAME, manifest.to_json())
    except BaseException:
        for p in placed:
            p.unlink(missing_ok=True)
        raise
    for rel in sorted(dropped):  # caches a conflict replaced: no longer listed, so they must go
        (bundle / rel).unlink(missing_ok=True)
