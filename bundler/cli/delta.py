"""Update commands of `trtx-bundle`: diff (make an update file OLD -> NEW) and apply (turn OLD into NEW with it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from .app import StderrProgress, emit_json, main, mib, render_errors, result


def _progress(progress: StderrProgress, label: str) -> Callable[[str, int, int], None]:
    return lambda what, done, total: progress.advance(label, done, total)


@main.command("diff")
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Update file to write (.trtxd).",
)
@click.option(
    "--level",
    type=click.IntRange(1, 22),
    help="zstd level for the whole files the update carries (engines, caches); default 10. 19 packs real engines "
    "~5% smaller, ~100x slower.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@render_errors
def diff(old: Path, new: Path, output: Path, level: int | None, as_json: bool) -> None:
    """Write an update file that turns bundle OLD into bundle NEW, holding only the bytes OLD lacks.

    \b
    It carries NEW's manifest.json (and manifest.sig where NEW is signed), the files NEW pins
    that OLD lacks, and NEW's weight file as a recipe: frames OLD has are copied from OLD's
    weight file, only the others travel. Users run: trtx-bundle apply BUNDLE update.trtxd
    (apps: runtime_shim.apply_update). OLD and NEW may be .trtx archives (unpacked beside
    the update first). docs/DELTA.md describes the format.
    """
    from ..delta import DEFAULT_LEVEL, diff_bundles

    progress = StderrProgress()
    with progress.step("write update"):
        r = diff_bundles(old, new, output, level=level or DEFAULT_LEVEL, progress=_progress(progress, "write update"))
    if as_json:
        emit_json(r.to_dict())
        return
    lines = [
        f"wrote {r.path}: {mib(r.size)}, {100 * r.share:.1f}% of NEW's {mib(r.new_bytes)}",
        f"  files: {len(r.reused)} taken from OLD, {len(r.carried)} carried ({mib(r.carried_bytes)} -> "
        f"{mib(r.carried_stored)})",
    ]
    if r.weight_frames:
        lines.append(
            f"  weights: {r.weight_frames_copied} of {r.weight_frames} frames copied from OLD "
            f"({mib(r.weight_bytes_copied)}), {mib(r.weight_bytes_literal)} carried"
        )
    else:
        lines.append("  weights: NEW's weight file is OLD's")
    if r.signed:
        lines.append("  signature: NEW's manifest.sig carried")
    result("\n".join(lines))


@main.command("apply")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.argument("update", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the new bundle to this new (or empty) directory and leave BUNDLE as it is.",
)
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trusted PEM public key (repeatable): the new bundle must be signed by one of them, checked before anything "
    "is written.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@render_errors
def apply(bundle: Path, update: Path, out: Path | None, keys: tuple[Path, ...], as_json: bool) -> None:
    """Turn BUNDLE into the new bundle UPDATE was made for (trtx-bundle diff), atomically.

    \b
    BUNDLE must be the OLD the update was made from. The new bundle is built beside it, every
    file checked against the new manifest, then swapped in at once: on any failure BUNDLE is
    left as it was. With -o the new bundle goes to OUT and BUNDLE is not touched.
    """
    from runtime_shim.delta import apply_update

    progress = StderrProgress()
    with progress.step("apply update"):
        r = apply_update(
            bundle, update, out, trusted_keys=list(keys) or None, progress=_progress(progress, "apply update")
        )
    if as_json:
        emit_json(r.to_dict())
        return
    where = f"{r.bundle} updated in place" if r.in_place else f"new bundle written to {r.bundle}"
    result(
        f"{where}: manifest.json sha256 {r.new_manifest_sha256}\n"
        f"  files: {r.files} ({r.reused} from the old bundle by {r.reuse}, {r.carried} from the update)"
        + (
            f"\n  weights: {mib(r.weight_bytes_from_old)} from the old weight file, "
            f"{mib(r.weight_bytes_from_update)} from the update"
            if r.weight_bytes_from_old or r.weight_bytes_from_update
            else ""
        )
        + ("\n  signature: manifest.sig from the update" if r.signed else "")
    )
