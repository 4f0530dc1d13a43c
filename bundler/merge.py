"""Fold farm parts into a bundle: check every part and the bundle itself, resolve cache-key conflicts, then commit.

Each part is for one model (part.json names it) and goes into that model's engines and runtime caches, checked
against that model (part_checks.py); conflicts are per model, and the other models' records stay as they were.
Writing the result, all of it or none of it, and the lock that keeps two merges of one bundle from losing a
part, are in merge_commit.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from runtime_shim.cache_key import key_text as _key_text
from runtime_shim.machine import sm_text
from runtime_shim.manifest import BundleManifest, CacheKey, Engine, Manifest, RuntimeCache, read_bundle_manifest
from runtime_shim.signing import SIGNATURE_NAME, signature_status

from .bundle_io import check_pinned_files, raise_for_problems
from .merge_commit import LOCK_TIMEOUT_S, MergeError, bundle_lock, commit
from .part import Part, read_parts
from .part_checks import check_part

log = logging.getLogger(__name__)

PREFER_POLICIES = ("newest", "oldest")


@dataclass(frozen=True, kw_only=True)
class CacheConflict:
    """Two or more different caches for one key of one model: one kept, the others dropped, and why."""

    key: CacheKey
    kept: str  # where the kept cache came from: "bundle" or a part directory
    kept_sha256: str
    dropped: tuple[tuple[str, str, int | None], ...]  # (source, sha256, created)
    reason: str
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "key": self.key.to_dict(),
            "kept": {"source": self.kept, "sha256": self.kept_sha256},
            "reason": self.reason,
            "dropped": [{"source": s, "sha256": h, "created": c} for s, h, c in self.dropped],
        }


R = TypeVar("R", Engine, RuntimeCache)


@dataclass(frozen=True)
class Added(Generic[R]):
    """An engine or runtime cache a merge added, and the model it was added to."""

    model: str
    record: R

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, **self.record.to_dict()}


@dataclass(frozen=True, kw_only=True)
class MergeReport:
    bundle: Path
    out: Path
    parts: tuple[str, ...]  # each part merged (a PART_DIR, or PART_DIR/<folder> for one model of several)
    models: tuple[str, ...] = ()  # the bundle's models
    engines_added: tuple[Added[Engine], ...] = ()
    caches_added: tuple[Added[RuntimeCache], ...] = ()
    conflicts: tuple[CacheConflict, ...] = ()
    notes: tuple[str, ...] = field(default=())
    signature_removed: bool = False  # the bundle was signed; the merged manifest is not (sign it again)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "out": str(self.out),
            "parts": list(self.parts),
            "models": list(self.models),
            "engines_added": [a.to_dict() for a in self.engines_added],
            "caches_added": [a.to_dict() for a in self.caches_added],
            "conflicts": [c.to_dict() for c in self.conflicts],
            "notes": list(self.notes),
            "signature_removed": self.signature_removed,
        }


@dataclass(frozen=True)
class _Given:
    """One part to merge: where it is, how to name it, and the PART_DIR it came in (for --prefer)."""

    source: str  # as given, or PART_DIR/<folder> for one model's part of a multi-model PART_DIR
    path: Path
    origin: Path  # the PART_DIR as given, resolved
    part: Part


@dataclass(frozen=True)
class _Candidate:
    cache: RuntimeCache
    source: str  # "bundle" or the part directory as given
    order: int  # 0 = the bundle, then the parts in command-line order (breaks ties in `created`)
    src_dir: Path
    preferred: bool  # named by --prefer (the bundle, the part, or the PART_DIR it came in)


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
    manifest, warnings, manifest_sha = read_bundle_manifest(bundle)
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
    parts: list[_Given] = []
    seen: set[Path] = set()
    for given in part_dirs:
        for path, part, part_warnings in read_parts(given):
            source = str(given) if path == Path(given) else str(Path(given) / path.name)
            if path.resolve() in seen:
                notes.append(f"{source}: given twice; merged once")
                continue
            seen.add(path.resolve())
            notes += [f"{path}: {w}" for w in part_warnings]
            check_part(path, part, manifest, manifest_sha, bundle, notes)
            parts.append(_Given(source, path, Path(given).resolve(), part))
    prefer_source = _prefer_source(prefer, bundle, parts)

    merged = manifest
    engine_src: dict[str, Path] = {}
    cache_src: dict[str, Path] = {}
    added_engines: list[Added[Engine]] = []
    added_caches: list[Added[RuntimeCache]] = []
    conflicts: list[CacheConflict] = []
    for view in manifest.views():  # each model takes only its own parts: nothing of another model changes
        mine = [g for g in parts if g.part.model == view.model.name]
        if not mine:
            continue
        engines, new_engines = _add_engines(view, mine, engine_src, notes)
        caches, model_conflicts, sources = _resolve_caches(view, mine, bundle, prefer, prefer_source, notes)
        cache_src.update(sources)
        added_engines += [Added(view.model.name, e) for e in new_engines]
        added_caches += [Added(view.model.name, c) for c in caches if c.file.sha256 in sources]
        conflicts += model_conflicts
        merged = merged.with_view(replace(view, engines=tuple(engines), runtime_caches=tuple(caches)))
    BundleManifest.from_dict(merged.to_dict(), source="the merged manifest")  # the same checks a reader will make
    unchanged = merged == manifest and out is None
    # A signature covers manifest.json's bytes: the merged manifest is another one, so the commit leaves it out.
    unsigned = signature_status(bundle).present and not unchanged
    report = MergeReport(
        bundle=bundle,
        out=target,
        parts=tuple(g.source for g in parts),
        models=manifest.names,
        engines_added=tuple(added_engines),
        caches_added=tuple(added_caches),
        conflicts=tuple(conflicts),
        notes=tuple(notes),
        signature_removed=unsigned,
    )
    if unchanged:
        say("nothing new: every engine and cache of these parts is already in the bundle")
        return report
    new_files = {
        ref.path: (engine_src.get(ref.sha256) or cache_src[ref.sha256], ref)
        for _w, ref in merged.files()
        if ref.sha256 in engine_src or ref.sha256 in cache_src
    }
    # Bundle-wide: a file one model no longer pins stays while another model pins it.
    dropped = {ref.path for _w, ref in manifest.files()} - {ref.path for _w, ref in merged.files()}
    # What is carried forward from the bundle is checked as strictly as what comes from the parts.
    carried = {ref.path for _w, ref in merged.files()} - set(new_files)
    raise_for_problems(
        check_pinned_files(bundle, manifest, only=carried), what=f"{bundle}: cannot merge into a damaged bundle"
    )
    commit(bundle.resolve(), target, merged, new_files, dropped, in_place=out is None, say=say)
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


def _add_engines(
    view: Manifest, parts: Sequence[_Given], engine_src: dict[str, Path], notes: list[str]
) -> tuple[list[Engine], list[Engine]]:
    """The model's engines with its parts' new ones (and those new ones); every part's cache must name one of them."""
    engines = list(view.engines)
    added: list[Engine] = []
    for g in parts:
        e = g.part.engine
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
                f"{g.source}: model {view.model.name!r} already has another {e.kind} engine for SM {_sms(e)} on "
                f"{e.platform}; both kept (each runtime cache names the engine it was made with)"
            )
        engines.append(e)
        engine_src[e.file.sha256] = g.path
        added.append(e)
    known = {e.file.sha256 for e in engines}
    for g in parts:
        missing = [s for s in g.part.runtime_cache.engines if s not in known]
        if missing:
            raise MergeError(
                f"{g.source}: its runtime cache was made with engine {missing[0]}, which is neither in the bundle nor "
                f"in any part given (model {view.model.name!r})",
                hint="merge the part that built that engine in the same run, or run the farm job again on this bundle",
            )
    return engines, added


def _prefer_source(prefer: str, bundle: Path, parts: Sequence[_Given]) -> str | Path | None:
    """What --prefer names: None for a policy, "bundle", or a PART_DIR (resolved; all its models' parts)."""
    if prefer in PREFER_POLICIES:
        return None
    wanted = Path(prefer).resolve()
    if wanted == bundle.resolve():
        return "bundle"
    for g in parts:
        if wanted in (g.path.resolve(), g.origin):
            return wanted
    given = dict.fromkeys(str(g.origin) for g in parts)
    raise MergeError(
        f"--prefer {prefer}: expected newest, oldest, the bundle, or one of the PART_DIRs given ({', '.join(given)})"
    )


def _resolve_caches(
    manifest: Manifest,
    parts: Sequence[_Given],
    bundle: Path,
    prefer: str,
    prefer_source: str | Path | None,
    notes: list[str],
) -> tuple[list[RuntimeCache], list[CacheConflict], dict[str, Path]]:
    """One cache per key of this model. Identical bytes are one cache; different bytes are a conflict, settled by
    ``prefer``."""
    candidates = [_Candidate(c, "bundle", 0, bundle, prefer_source == "bundle") for c in manifest.runtime_caches]
    candidates += [
        _Candidate(g.part.runtime_cache, g.source, i + 1, g.path, prefer_source in (g.origin, g.path.resolve()))
        for i, g in enumerate(parts)
    ]
    groups: dict[CacheKey, list[_Candidate]] = {}
    for c in candidates:
        group = groups.setdefault(c.cache.key, [])
        if any(g.cache.file.sha256 == c.cache.file.sha256 for g in group):
            if c.source != "bundle":
                notes.append(
                    f"{c.source}: its runtime cache for {_key_text(c.cache.key)} is already there "
                    f"(model {manifest.model.name!r}, same bytes)"
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
            preferred = [g for g in group if g.preferred]
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
                    model=manifest.model.name,
                )
            )
        out.append(winner.cache)
        if winner.source != "bundle":
            sources[winner.cache.file.sha256] = winner.src_dir
    return out, conflicts, sources


def _sms(engine: Engine) -> str:
    return ", ".join(map(sm_text, engine.compute_capabilities)) or "default"
