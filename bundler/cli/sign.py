"""`trtx-bundle sign`: write manifest.sig, the bundle's signature (parse, call bundler/sign.py, render)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .app import emit_json, info, main, render_errors, result


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--key",
    "key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM elliptic-curve private key (openssl ecparam -genkey -name prime256v1 -noout -out private.pem).",
)
@click.option(
    "--keyless",
    is_flag=True,
    help="Sign with Sigstore (a short-lived certificate for an OIDC identity, logged in Rekor): for CI jobs with an "
    "identity token. Needs network access to Sigstore.",
)
@click.option(
    "--identity-token",
    metavar="TOKEN",
    help="OIDC identity token for --keyless (default: $SIGSTORE_ID_TOKEN, else the CI's ambient credentials, "
    "else a browser login).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@render_errors
def sign(bundle: Path, key: Path | None, keyless: bool, identity_token: str | None, as_json: bool) -> None:
    """Sign BUNDLE: manifest.sig, an OpenSSF model-signing signature over manifest.json.

    \b
    manifest.json pins every other file by sha256, so its signature covers the whole bundle.
    The bundle must pass verify first. Sign after merge (a merge removes the signature), then
    pack: the archive carries it. Check it with: trtx-bundle verify BUNDLE --key PUBLIC.pem
    """
    from ..sign import sign_bundle

    if (key is None) == (not keyless):
        raise click.UsageError("give --key PRIVATE.pem or --keyless (one of them)")
    if identity_token is not None and not keyless:
        raise click.UsageError("--identity-token goes with --keyless")
    if keyless and identity_token is None:
        identity_token = os.environ.get("SIGSTORE_ID_TOKEN") or None
    if identity_token is not None and not identity_token.strip():
        raise click.UsageError("--identity-token is empty")
    r = sign_bundle(bundle, private_key=key, keyless=keyless, identity_token=identity_token)
    if r.replaced:
        info(f"note: replaced the earlier {r.signature.name}")
    if as_json:
        emit_json(r.to_dict())
        return
    by = f"key {r.key}" if r.kind == "key" else "Sigstore (keyless)"
    result(f"signed {r.bundle}: {r.signature.name} by {by}, over manifest.json sha256 {r.manifest_sha256}")
