"""Bundle signatures: manifest.sig, an OpenSSF model-signing signature over manifest.json's exact bytes, checked here.

manifest.json pins every other file by sha256 and size, so a signature over its bytes covers the whole bundle.
manifest.sig is what model-signing writes when it signs manifest.json as a single-file model: a Sigstore bundle
holding a DSSE envelope over an in-toto statement whose one resource is manifest.json's sha256. Other tools read it
too (``model_signing verify key --signature manifest.sig --public_key pub.pem manifest.json``).

The cryptography is model-signing's (the ``signing`` extra: ``pip install 'trtx-runtime[signing]'``), imported
only when a signature is actually checked; ``signature_status`` (is there one?) needs nothing. The library reads
paths, so the bytes checked here are first copied into a private temp dir: what is verified is exactly the bytes
this process read, and a hostile manifest.sig (a link, a fifo, a huge file) is refused before the library sees it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import SignatureError
from .fsutil import read_regular_file

SIGNATURE_NAME = "manifest.sig"
# A Sigstore bundle with a certificate chain and a transparency-log entry is ~10 KB; a key-signed one ~1.5 KB.
MAX_SIGNATURE_BYTES = 1 << 20
# Same cap as the archive reader's: no real manifest comes near it.
MAX_MANIFEST_BYTES = 64 << 20
EXTRA_HINT = "install the signing extra: pip install 'trtx-runtime[signing]'"
_RESIGN = "sign the bundle again (trtx-bundle sign BUNDLE --key PRIVATE.pem) or fetch the publisher's copy"

TrustedKey = str | os.PathLike[str] | bytes  # a PEM public key: its path, or its bytes


@dataclass(frozen=True, kw_only=True)
class SignatureStatus:
    """Whether a bundle is signed, and what checking the signature found (``verified`` None: not checked)."""

    present: bool
    verified: bool | None = None
    file: str = SIGNATURE_NAME
    kind: str | None = None  # "key" (a PEM key pair) | "keyless" (a Sigstore certificate); None: not looked at
    key: str | None = None  # "sha256:<hex>" of the public key it verified with (key kind)
    identity: str | None = None  # the identity and issuer it verified with (keyless kind)
    issuer: str | None = None
    manifest_sha256: str | None = None  # what the signature covers, once verified

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def words(self) -> str:
        if not self.present:
            return "none (the bundle is not signed)"
        if not self.verified:
            return f"present ({self.file}), not checked: no trusted key given"
        by = self.key if self.kind == "key" else f"{self.identity} (issuer {self.issuer})"
        return f"verified ({self.kind} {by})"


def signature_status(bundle_dir: str | os.PathLike[str]) -> SignatureStatus:
    """Present or absent, nothing verified and nothing imported (the report of a load without trusted keys)."""
    try:
        os.lstat(Path(bundle_dir) / SIGNATURE_NAME)
    except OSError:
        return SignatureStatus(present=False)
    return SignatureStatus(present=True)


def read_signature(bundle_dir: str | os.PathLike[str]) -> bytes | None:
    """manifest.sig's bytes (None where there is none), refused unless it is a regular file of at most 1 MiB."""
    path = Path(bundle_dir) / SIGNATURE_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SignatureError(f"{path}: cannot look at the signature ({e.strerror or e})") from None
    if stat.S_ISLNK(st.st_mode):
        raise SignatureError(f"{path}: is a symbolic link; expected the signature as a regular file", hint=_RESIGN)
    try:
        return read_regular_file(
            path, MAX_SIGNATURE_BYTES, "the bundle's signature, a Sigstore bundle", error=SignatureError
        )
    except FileNotFoundError:
        return None


def verify_bundle_signature(
    bundle_dir: str | os.PathLike[str],
    trusted_keys: Sequence[TrustedKey] = (),
    *,
    identity: str | None = None,
    issuer: str | None = None,
) -> SignatureStatus:
    """Check ``bundle_dir``'s manifest.sig over its manifest.json (see ``verify_signature``); SignatureError if not."""
    root = Path(bundle_dir)
    where = str(root)
    try:
        manifest = read_regular_file(root / "manifest.json", MAX_MANIFEST_BYTES, "the bundle's manifest.json")
    except FileNotFoundError:
        raise SignatureError(
            f"{where}: no manifest.json (not a bundle directory); nothing to check a signature against"
        ) from None
    signature = read_signature(root)
    if signature is None:
        raise SignatureError(
            f"{where}: not signed (no {SIGNATURE_NAME}), but {_expected(trusted_keys, identity, issuer)} was required",
            hint="sign it (trtx-bundle sign BUNDLE --key PRIVATE.pem), or fetch the signed copy from its publisher",
        )
    return verify_signature(manifest, signature, trusted_keys, identity=identity, issuer=issuer, where=where)


def verify_signature(
    manifest: bytes,
    signature: bytes,
    trusted_keys: Sequence[TrustedKey] = (),
    *,
    identity: str | None = None,
    issuer: str | None = None,
    where: str,
) -> SignatureStatus:
    """Check that ``signature`` (manifest.sig's bytes) signs exactly ``manifest`` (manifest.json's bytes).

    With ``trusted_keys`` (PEM public keys): made by one of them. With ``identity`` and ``issuer``: a keyless
    Sigstore signature by that identity (needs Sigstore's servers for the trust root). ``where`` (the bundle)
    starts every error message. Raises SignatureError saying what was found and what was expected.
    """
    if not trusted_keys and not (identity and issuer):
        raise SignatureError(
            f"{where}: nothing to check the signature against",
            hint="give at least one trusted public key (or, for keyless signatures, an identity and its issuer)",
        )
    envelope = parse_signature(signature, where=where)
    sha = hashlib.sha256(manifest).hexdigest()
    if trusted_keys:
        keys = [_load_public_key(k, i) for i, k in enumerate(trusted_keys)]
        if envelope.kind != "key":
            raise SignatureError(
                f"{where}: {SIGNATURE_NAME} is a keyless (Sigstore certificate) signature, but a signature by "
                f"{_expected(trusted_keys, None, None)} was required",
                hint="verify it with --identity and --issuer, or sign with the key pair",
            )
        if envelope.key_hint is None:
            raise SignatureError(
                f"{where}: {SIGNATURE_NAME} does not name its public key (an older model-signing format)", hint=_RESIGN
            )
        match = next((k for k in keys if k.fingerprint == envelope.key_hint), None)
        if match is None:
            raise SignatureError(
                f"{where}: signed by another key (sha256:{envelope.key_hint}); expected "
                + " or ".join(f"sha256:{k.fingerprint} ({k.name})" for k in keys),
                hint="pass the publisher's public key, or fetch the bundle from its publisher",
            )
        # Checked before the library so that an edited manifest is named as such; the library then checks that the
        # statement is authentic, which makes this check (one resource: manifest.json's sha256) hold for real.
        _check_manifest_covered(envelope, sha, where)
        with _staged(manifest, signature, match.pem) as (model, sig, pem):
            _run_library(
                where, lambda verifying: verifying.Config().use_elliptic_key_verifier(public_key=pem), model, sig
            )
        return SignatureStatus(
            present=True, verified=True, kind="key", key=f"sha256:{match.fingerprint}", manifest_sha256=sha
        )
    if envelope.kind != "keyless":
        raise SignatureError(
            f"{where}: {SIGNATURE_NAME} was made with a key pair (sha256:{envelope.key_hint}), but a keyless "
            f"signature by {identity} was required",
            hint="verify it with --key PUBLIC.pem",
        )
    _check_manifest_covered(envelope, sha, where)
    with _staged(manifest, signature, None) as (model, sig, _pem):
        _run_library(
            where,
            lambda verifying: verifying.Config().use_sigstore_verifier(identity=identity, oidc_issuer=issuer),
            model,
            sig,
        )
    return SignatureStatus(
        present=True, verified=True, kind="keyless", identity=identity, issuer=issuer, manifest_sha256=sha
    )


def check_signature(
    bundle_dir: str | os.PathLike[str], trusted_keys: TrustedKey | Sequence[TrustedKey] | None
) -> SignatureStatus:
    """load()'s check: without trusted keys, present or absent; with them, verified or SignatureError."""
    if trusted_keys is None:
        return signature_status(bundle_dir)
    keys = [trusted_keys] if isinstance(trusted_keys, (str, bytes, bytearray, os.PathLike)) else list(trusted_keys)
    if not keys:
        raise SignatureError(
            f"{bundle_dir}: trusted_keys is empty, so no signature could ever be accepted",
            hint="pass the publisher's public key(s), or trusted_keys=None to load without checking a signature",
        )
    return verify_bundle_signature(bundle_dir, keys)


def key_fingerprint(key: TrustedKey) -> str:
    """The sha256 of the key's PEM SubjectPublicKeyInfo: what a key-made manifest.sig names as its key's hint."""
    return _load_public_key(key, 0).fingerprint


# --------------------------------------------------------------------------- the signature file, parsed
@dataclass(frozen=True)
class Envelope:
    """What a manifest.sig says before any check: its kind, its key hint, and the resources of its statement."""

    kind: str  # key | keyless
    key_hint: str | None
    resources: list[Any]


def parse_signature(data: bytes, *, where: str) -> Envelope:
    """The signature's outline, or SignatureError naming manifest.sig: not JSON, not a Sigstore bundle, cut short."""
    bad = f"{where}: {SIGNATURE_NAME} is not a model-signing signature (a Sigstore bundle over an in-toto statement)"
    try:
        doc = json.loads(data.decode("utf-8"))
        material = doc["verificationMaterial"]
        if not str(doc["mediaType"]).startswith("application/vnd.dev.sigstore.bundle"):
            raise ValueError(f"media type {doc['mediaType']!r}")
        payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"], validate=True))
        resources = payload["predicate"]["resources"]
        if not isinstance(resources, list):
            raise ValueError("predicate.resources is not a list")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"{bad}: not JSON, or cut short ({e})", hint=_RESIGN) from None
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise SignatureError(f"{bad}: {type(e).__name__} {e}", hint=_RESIGN) from None
    if not isinstance(material, dict):
        raise SignatureError(f"{bad}: verificationMaterial is not an object", hint=_RESIGN)
    if "publicKey" in material:
        hint = material["publicKey"].get("hint") if isinstance(material["publicKey"], dict) else None
        return Envelope("key", hint if isinstance(hint, str) and hint else None, resources)
    return Envelope("keyless", None, resources)


def _check_manifest_covered(envelope: Envelope, sha: str, where: str) -> None:
    signed = [r.get("digest") for r in envelope.resources if isinstance(r, dict) and r.get("algorithm") == "sha256"]
    if len(envelope.resources) != 1 or len(signed) != 1:
        raise SignatureError(
            f"{where}: {SIGNATURE_NAME} signs {len(envelope.resources)} file(s), not manifest.json alone",
            hint="it was not made by 'trtx-bundle sign' for this bundle; " + _RESIGN,
        )
    if signed[0] != sha:
        raise SignatureError(
            f"{where}: manifest.json changed after it was signed: its sha256 is {sha}, the signature covers {signed[0]}",
            hint="the bundle was modified (a merge, an edit) or tampered with; " + _RESIGN,
        )


# --------------------------------------------------------------------------- keys and the library
@dataclass(frozen=True)
class _PublicKey:
    name: str  # the path, or "key #<i>" for PEM bytes
    pem: bytes  # SubjectPublicKeyInfo PEM, as model-signing writes it into its hint
    fingerprint: str


def _load_public_key(key: TrustedKey, index: int) -> _PublicKey:
    if isinstance(key, (bytes, bytearray)):
        name, data = f"trusted key #{index + 1}", bytes(key)
    else:
        name = os.fspath(key)
        try:
            data = read_regular_file(name, 1 << 16, "a PEM public key", error=SignatureError)
        except FileNotFoundError:
            raise SignatureError(f"{name}: trusted public key not found") from None
    try:
        from cryptography.hazmat.primitives import serialization  # model-signing's own dependency
    except ImportError:
        raise SignatureError(f"{name}: checking signatures needs model-signing", hint=EXTRA_HINT) from None
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        private = b"PRIVATE KEY-----" in data
        raise SignatureError(
            f"{name}: not a PEM public key ({'a private key' if private else e})",
            hint="pass the public half: openssl ec -in PRIVATE.pem -pubout -out PUBLIC.pem",
        ) from None
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _PublicKey(name, pem, hashlib.sha256(pem).hexdigest())


@contextlib.contextmanager
def _staged(manifest: bytes, signature: bytes, pem: bytes | None) -> Iterator[tuple[Path, Path, Path]]:
    """manifest.json, manifest.sig and the key, copied into a private temp dir for the library to read."""
    with tempfile.TemporaryDirectory(prefix="trtx-signature-") as tmp:
        root = Path(tmp)
        (root / "manifest.json").write_bytes(manifest)
        (root / SIGNATURE_NAME).write_bytes(signature)
        (root / "key.pem").write_bytes(pem or b"")
        yield root / "manifest.json", root / SIGNATURE_NAME, root / "key.pem"


def import_model_signing(where: str) -> Any:
    """The ``model_signing`` package, or SignatureError saying which extra brings it."""
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying

        return model_signing
    except ImportError as e:
        raise SignatureError(
            f"{where}: checking or making signatures needs model-signing ({e})", hint=EXTRA_HINT
        ) from None


def hashing_config(model_signing: Any) -> Any:
    """One file, sha256: how manifest.json is hashed both when signing and when verifying."""
    return model_signing.hashing.Config().use_file_serialization(hashing_algorithm="sha256")


def _run_library(where: str, configure: Any, model: Path, sig: Path) -> None:
    ms = import_model_signing(where)
    config = configure(ms.verifying).set_hashing_config(hashing_config(ms))
    try:
        config.verify(model, sig)
    except Exception as e:  # the library raises ValueError, KeyError, cryptography's and sigstore's own errors
        detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise SignatureError(
            f"{where}: {SIGNATURE_NAME} does not verify ({type(e).__name__}: {detail})",
            hint="the signature is damaged or forged; " + _RESIGN,
        ) from None


def _expected(trusted_keys: Sequence[TrustedKey], identity: str | None, issuer: str | None) -> str:
    if trusted_keys:
        names = [
            os.fspath(k) if not isinstance(k, (bytes, bytearray)) else f"key #{i + 1}"
            for i, k in enumerate(trusted_keys)
        ]
        return "a signature by " + (names[0] if len(names) == 1 else "one of " + ", ".join(names))
    return f"a keyless signature by {identity} (issuer {issuer})"
