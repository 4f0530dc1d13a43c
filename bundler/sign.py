"""Signing a bundle: manifest.sig, an OpenSSF model-signing signature over manifest.json's bytes, written atomically.

manifest.json pins every other file, so signing its exact bytes signs the bundle (runtime_shim.signing checks it,
in load(trusted_keys=...) and in ``trtx-bundle verify --key``). Signing takes the bundle's merge lock, so a merge
cannot replace the manifest between the read here and the signature's write; a merge then removes the signature
(merge.py), since it no longer covers the new manifest.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime_shim.errors import BundleError, SignatureError
from runtime_shim.fsutil import atomic_write, read_regular_file
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest
from runtime_shim.signing import (
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    SignatureStatus,
    TrustedKey,
    hashing_config,
    import_model_signing,
    parse_signature,
    read_signature,
    verify_signature,
)

from .bundle_io import Problem, raise_for_problems, verify_bundle
from .merge_commit import bundle_lock

log = logging.getLogger(__name__)

KEYGEN_HINT = (
    "make a key pair with: openssl ecparam -genkey -name prime256v1 -noout -out private.pem && "
    "openssl ec -in private.pem -pubout -out public.pem"
)
KEYLESS_HINT = (
    "keyless signing needs Sigstore's servers (Fulcio, Rekor) and an OIDC identity token: in CI, the job's token "
    "(GitHub: permissions id-token: write; GitLab: id_tokens with aud sigstore, in SIGSTORE_ID_TOKEN)"
)


@dataclass(frozen=True, kw_only=True)
class SignResult:
    bundle: Path
    signature: Path
    kind: str  # key | keyless
    key: str | None  # sha256:<hex> of the public key (key kind)
    manifest_sha256: str
    replaced: bool  # an earlier manifest.sig was there

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bundle": str(self.bundle), "signature": str(self.signature)}


def sign_bundle(
    bundle_dir: str | os.PathLike[str],
    *,
    private_key: str | os.PathLike[str] | None = None,
    keyless: bool = False,
    identity_token: str | None = None,
) -> SignResult:
    """Sign the bundle directory: with ``private_key`` (a PEM EC key), or ``keyless`` with Sigstore.

    The bundle must pass verify first (a signature vouches for every file the manifest pins). ``identity_token``
    (keyless): an OIDC token; without one, model-signing looks for the CI's ambient credentials, then asks the
    user to log in through a browser.
    """
    bundle = Path(bundle_dir)
    if (private_key is None) == (not keyless):
        raise SignatureError("sign: give either a private key or keyless, not both and not neither")
    if bundle.is_file():
        raise SignatureError(
            f"{bundle}: an archive; sign the bundle directory, then pack it (the signature travels in the archive)",
            hint=f"trtx-bundle unpack {bundle} -o DIR, trtx-bundle sign DIR ..., trtx-bundle pack DIR -o {bundle.name}",
        )
    key_pem = _read_private_key(Path(private_key)) if private_key is not None else None
    with bundle_lock(bundle.resolve(), required=True, say=log.info):
        raise_for_problems(verify_bundle(bundle), what=f"{bundle}: cannot sign")
        manifest_path = bundle / MANIFEST_NAME
        raw = read_regular_file(manifest_path, MAX_MANIFEST_BYTES, "the bundle's manifest.json")
        BundleManifest.from_json(raw, source=str(manifest_path))  # every model: the signature covers them all
        signature = _sign_bytes(bundle, raw, key_pem, identity_token)
        public = _public_pem(key_pem) if key_pem is not None else None
        status = (
            verify_signature(raw, signature, [public], where=str(bundle)) if public is not None else None
        )  # what is written must verify: a library change would show here, not in the app
        if read_regular_file(manifest_path, MAX_MANIFEST_BYTES, "the bundle's manifest.json") != raw:
            raise SignatureError(f"{manifest_path}: changed while it was being signed; no signature written")
        replaced = os.path.lexists(bundle / SIGNATURE_NAME)
        atomic_write(bundle / SIGNATURE_NAME, signature)
    envelope = parse_signature(signature, where=str(bundle))
    return SignResult(
        bundle=bundle,
        signature=bundle / SIGNATURE_NAME,
        kind=envelope.kind,
        key=status.key if status is not None else None,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        replaced=replaced,
    )


def signature_check(
    bundle: Path, *, keys: tuple[TrustedKey, ...] = (), identity: str | None = None, issuer: str | None = None
) -> tuple[SignatureStatus | None, list[Problem]]:
    """verify's look at the signature of a bundle directory or archive: (status, problems).

    Without keys or identity: present or absent, and a present one must at least parse. With them: verified,
    or a problem naming what was found and what was expected. Status None: the manifest could not be read (verify
    reports that already).
    """
    required = bool(keys) or bool(identity)
    try:
        if bundle.is_file():
            from runtime_shim.archive import read_archive_signature

            raw, signature = read_archive_signature(bundle)
        else:
            raw = read_regular_file(bundle / MANIFEST_NAME, MAX_MANIFEST_BYTES, "the bundle's manifest.json")
            signature = read_signature(bundle)
    except SignatureError as e:
        return SignatureStatus(present=True, verified=False), [_problem(e)]
    except (BundleError, OSError):
        return None, []
    if signature is None:
        status = SignatureStatus(present=False, verified=False if required else None)
        if not required:
            return status, []
        return status, [
            Problem(
                kind="signature",
                path=SIGNATURE_NAME,
                message=f"missing: the bundle is not signed, but a signature by {_expected(keys, identity)} was asked for",
                hint="sign it: trtx-bundle sign BUNDLE --key PRIVATE.pem (or --keyless in CI)",
            )
        ]
    try:
        if not required:
            return SignatureStatus(present=True, kind=parse_signature(signature, where=str(bundle)).kind), []
        return verify_signature(raw, signature, keys, identity=identity, issuer=issuer, where=str(bundle)), []
    except SignatureError as e:
        return SignatureStatus(present=True, verified=False if required else None), [_problem(e)]


def _problem(e: SignatureError) -> Problem:
    return Problem(kind="signature", path=SIGNATURE_NAME, message=str(e), hint=e.hint)


def _expected(keys: tuple[TrustedKey, ...], identity: str | None) -> str:
    if keys:
        return ", ".join(os.fspath(k) if not isinstance(k, bytes) else "a key" for k in keys)
    return f"{identity}"


def _read_private_key(path: Path) -> bytes:
    """The key's PEM bytes, refused unless it is an unencrypted EC private key model-signing takes (P-256/384/521)."""
    try:
        data = read_regular_file(path, 1 << 16, "a PEM private key", error=SignatureError)
    except FileNotFoundError:
        raise SignatureError(f"{path}: private key not found", hint=KEYGEN_HINT) from None
    import_model_signing(str(path))  # cryptography comes with it
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SignatureError(
            f"{path}: an encrypted private key; sign takes an unencrypted PEM key (keep it in the CI's secret store)",
            hint="openssl ec -in ENCRYPTED.pem -out private.pem",
        ) from None
    except Exception as e:  # ValueError, and cryptography's UnsupportedAlgorithm
        raise SignatureError(f"{path}: not a PEM private key ({type(e).__name__}: {e})", hint=KEYGEN_HINT) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        what = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise SignatureError(
            f"{path}: a {what} key; model-signing signs with elliptic-curve keys P-256, P-384 or P-521",
            hint=KEYGEN_HINT,
        )
    return data


def _public_pem(private_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _sign_bytes(bundle: Path, raw: bytes, key_pem: bytes | None, identity_token: str | None) -> bytes:
    """model-signing's signature over ``raw`` as a single-file model named manifest.json (a private temp copy)."""
    ms = import_model_signing(str(bundle))
    with tempfile.TemporaryDirectory(prefix="trtx-sign-") as tmp:
        root = Path(tmp)
        (root / MANIFEST_NAME).write_bytes(raw)
        config = ms.signing.Config().set_hashing_config(hashing_config(ms))
        try:
            if key_pem is not None:
                (root / "key.pem").write_bytes(key_pem)
                config.use_elliptic_key_signer(private_key=root / "key.pem")
            else:
                config.use_sigstore_signer(
                    identity_token=identity_token, use_ambient_credentials=identity_token is None
                )
            config.sign(root / MANIFEST_NAME, root / SIGNATURE_NAME)
        except Exception as e:  # the library raises ValueError, sigstore's errors, network errors
            detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise SignatureError(
                f"{bundle}: {'keyless ' if key_pem is None else ''}signing failed ({type(e).__name__}: {detail}); "
                "no signature written",
                hint=KEYLESS_HINT if key_pem is None else KEYGEN_HINT,
            ) from None
        return (root / SIGNATURE_NAME).read_bytes()
