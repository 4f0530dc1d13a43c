"""`trtx-bundle upgrade`: rewrite a bundle's manifest as schema 2 with BLAKE3 frame digests (parse, call, render)."""

from __future__ import annotations

from pathlib import Path

import click

from .app import StderrProgress, emit_json, main, mib, render_errors, result


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@render_errors
def upgrade(bundle: Path, as_json: bool) -> None:
    """Upgrade BUNDLE (a directory) in place to the current format: manifest schema 2, frames pinned by BLAKE3.

    \b
    Only manifest.json changes, in one atomic replace at the end; every other file keeps its
    bytes. The bundle is verified first and each frame's old sha256 is checked as it is read,
    so a damaged bundle is refused and left as it was. A bundle already up to date is left
    alone (exit 0). A signature (manifest.sig) covered the old manifest: it is removed, and
    the bundle must be signed again. An archive: unpack it, upgrade, pack it again.
    """
    from ..upgrade import upgrade_bundle

    progress = StderrProgress()
    label = "verifying, then re-pinning every weight frame"
    with progress.step(label):
        r = upgrade_bundle(bundle, progress=lambda done, total: progress.advance(label, done, total))
    # a removed signature is the library's warning (stderr); --json says it too (signature_removed)
    if as_json:
        emit_json(r.to_dict())
        return
    if not r.upgraded:
        result(f"{bundle}: already up to date (schema {r.schema_after}, frames pinned by {r.frame_digest_after})")
        return
    result(
        f"upgraded {bundle}: schema {r.schema_before} -> {r.schema_after}, frames pinned by "
        f"{r.frame_digest_before} -> {r.frame_digest_after} ({r.frames} frames, {mib(r.stored_bytes)}); "
        f"manifest.json sha256 {r.manifest_sha256_after}"
    )
