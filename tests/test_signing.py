"""Signed bundles (issue 14): real EC keys made here, real bundles built by the CLI, real archives, real loads.

Keyless (Sigstore) signing needs Sigstore's servers and an OIDC token: only its argument handling and its
failure without them are tested here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_merge import make_bundle, make_part

import runtime_shim
from bundler.cli import main
from bundler.merge import merge_parts
from bundler.sign import sign_bundle
from runtime_shim.errors import ArchiveError, SignatureError
from runtime_shim.signing import SIGNATURE_NAME, key_fingerprint, verify_bundle_signature
from tests import models


def cli(*args: str | Path, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)


def make_keys(where: Path, name: str) -> tuple[Path, Path]:
    """(private.pem, public.pem): a P-256 key pair in the PEM forms `openssl ecparam -genkey` / `openssl ec -pubout` write."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = where / f"{name}.pem", where / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An unsigned MLP bundle built by the CLI (no engine: the ONNX Runtime fallback runs it) and two key pairs."""
    root = tmp_path_factory.mktemp("signing")
    model = models.make_mlp(root / "m")
    r = cli("build", model, "-o", root / "bundle", "--shape", "x=1x64:4x64:16x64", "--no-weightful", "-q")
    assert r.exit_code == 0, r.output
    key, pub = make_keys(root, "publisher")
    other, other_pub = make_keys(root, "other")
    return {"root": root, "bundle": root / "bundle", "key": key, "pub": pub, "other": other, "other_pub": other_pub}


@pytest.fixture
def signed(built: dict[str, Path], tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(built["bundle"], bundle)
    r = cli("sign", bundle, "--key", built["key"])
    assert r.exit_code == 0, r.output
    return bundle


def load(bundle: Path, tmp_path: Path, **kw):
    return runtime_shim.load(bundle, app="test-signing", cache_dir=tmp_path / "cache", **kw)


# --------------------------------------------------------------------------- sign and verify
def test_sign_verify_round_trip(built: dict[str, Path], signed: Path) -> None:
    assert (signed / SIGNATURE_NAME).is_file()
    ok = cli("verify", signed, "--key", built["pub"])
    assert ok.exit_code == 0 and ok.stdout.startswith("OK ") and "signature: verified (key sha256:" in ok.stdout
    j = json.loads(cli("verify", signed, "--key", built["other_pub"], "--key", built["pub"], "--json").stdout)
    assert j["ok"] and j["signature"]["verified"] is True and j["signature"]["kind"] == "key"
    assert j["signature"]["key"] == f"sha256:{key_fingerprint(built['pub'])}"
    assert j["problems"] == [], "manifest.sig is not an extra file"
    plain = cli("verify", signed)
    assert plain.exit_code == 0 and "signature: present" in plain.stdout and "not checked" in plain.stdout
    unsigned = cli("verify", built["bundle"])
    assert unsigned.exit_code == 0 and "signature: none" in unsigned.stdout


def test_the_signature_is_model_signing_s_own_format(built: dict[str, Path], signed: Path) -> None:
    """Other tools check it: model-signing's own CLI verifies manifest.json with it as a single-file model."""
    doc = json.loads((signed / SIGNATURE_NAME).read_bytes())
    assert doc["mediaType"].startswith("application/vnd.dev.sigstore.bundle")
    statement = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"][0]["name"] == "manifest.json"
    import hashlib

    digest = hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    assert [r["digest"] for r in statement["predicate"]["resources"]] == [digest]
    proc = subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", "--signature", str(signed / SIGNATURE_NAME)]
        + ["--public_key", str(built["pub"]), str(signed / "manifest.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_key_made_by_openssl_signs(built: dict[str, Path], tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed here (the keys of the other tests come from cryptography)")
    key, pub = tmp_path / "k.pem", tmp_path / "p.pem"
    subprocess.run([openssl, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key], check=True)
    subprocess.run([openssl, "ec", "-in", key, "-pubout", "-out", pub], check=True, capture_output=True)
    bundle = tmp_path / "b"
    shutil.copytree(built["bundle"], bundle)
    assert cli("sign", bundle, "--key", key).exit_code == 0
    assert cli("verify", bundle, "--key", pub).exit_code == 0


def test_wrong_key_is_refused(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    bad = cli("verify", signed, "--key", built["other_pub"], "--json")
    (problem,) = json.loads(bad.stdout)["problems"]
    assert bad.exit_code == 1 and problem["kind"] == "signature" and problem["path"] == SIGNATURE_NAME
    assert "signed by another key" in problem["message"] and str(built["other_pub"]) in problem["message"]
    with pytest.raises(SignatureError, match="signed by another key") as e:
        load(signed, tmp_path, trusted_keys=[built["other_pub"]])
    assert str(signed) in str(e.value)


def test_unsigned_bundle_is_refused_once_keys_are_pinned(built: dict[str, Path], tmp_path: Path) -> None:
    bad = cli("verify", built["bundle"], "--key", built["pub"])
    assert bad.exit_code == 1 and "not signed" in bad.stdout
    with pytest.raises(SignatureError, match=r"not signed \(no manifest.sig\)") as e:
        load(built["bundle"], tmp_path, trusted_keys=[built["pub"]])
    assert str(built["bundle"]) in str(e.value) and str(built["pub"]) in str(e.value) and e.value.hint
    with pytest.raises(SignatureError, match="trusted_keys is empty"):
        load(built["bundle"], tmp_path, trusted_keys=[])


def test_manifest_changed_after_signing_is_refused(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    manifest = signed / "manifest.json"
    doc = json.loads(manifest.read_bytes())
    doc["creator"]["created"] = 1_700_000_000  # still a valid manifest, every file intact: only the signature can tell
    manifest.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    assert cli("verify", signed).exit_code == 0
    bad = cli("verify", signed, "--key", built["pub"])
    assert bad.exit_code == 1 and "manifest.json changed after it was signed" in bad.stdout
    with pytest.raises(SignatureError, match="manifest.json changed after it was signed"):
        load(signed, tmp_path, trusted_keys=[built["pub"]])


def test_forged_signature_is_refused(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    doc = json.loads((signed / SIGNATURE_NAME).read_bytes())
    sig = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-3] ^= 0x01
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    (signed / SIGNATURE_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="manifest.sig does not verify"):
        load(signed, tmp_path, trusted_keys=[built["pub"]])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "huge", "symlink", "directory"])
def test_corrupt_signature_file_is_named(built: dict[str, Path], signed: Path, tmp_path: Path, damage: str) -> None:
    sig = signed / SIGNATURE_NAME
    data = sig.read_bytes()
    sig.unlink()
    if damage == "truncated":
        sig.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        sig.write_bytes(b"\x00\xff not a signature")
    elif damage == "huge":
        sig.write_bytes(data + b" " * (2 << 20))
    elif damage == "symlink":
        (tmp_path / "elsewhere.sig").write_bytes(data)
        sig.symlink_to(tmp_path / "elsewhere.sig")
    else:
        sig.mkdir()
    with pytest.raises(SignatureError, match=r"manifest\.sig") as e:
        load(signed, tmp_path, trusted_keys=[built["pub"]])
    assert e.value.hint or damage in ("symlink", "directory", "huge")
    for args in ((), ("--key", built["pub"])):  # even without keys, a broken signature file is a problem
        r = cli("verify", signed, *args, "--json")
        problems = json.loads(r.stdout)["problems"]
        assert r.exit_code == 1 and any(p["kind"] == "signature" and SIGNATURE_NAME in p["path"] for p in problems)


# --------------------------------------------------------------------------- the archive
def test_archive_round_trip_keeps_the_signature(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    archive = tmp_path / "b.trtx"
    assert cli("pack", signed, "-o", archive).exit_code == 0
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", SIGNATURE_NAME]
    assert cli("verify", archive, "--key", built["pub"]).exit_code == 0
    assert cli("verify", archive, "--key", built["other_pub"]).exit_code == 1
    assert cli("unpack", archive, "-o", tmp_path / "out").exit_code == 0
    assert (tmp_path / "out" / SIGNATURE_NAME).read_bytes() == (signed / SIGNATURE_NAME).read_bytes()
    assert cli("verify", tmp_path / "out", "--key", built["pub"]).exit_code == 0
    with load(archive, tmp_path, trusted_keys=[built["pub"]]) as s:
        assert s.report.signature["verified"] is True and s.backend == "onnxruntime"


def test_signed_and_unsigned_archives_of_one_manifest_get_their_own_copies(
    built: dict[str, Path], signed: Path, tmp_path: Path
) -> None:
    plain, sealed = tmp_path / "plain.trtx", tmp_path / "signed.trtx"
    assert cli("pack", built["bundle"], "-o", plain).exit_code == 0
    assert cli("pack", signed, "-o", sealed).exit_code == 0
    with load(plain, tmp_path) as s:
        assert s.report.signature["present"] is False
    with load(sealed, tmp_path, trusted_keys=[built["pub"]]) as s:  # not the unsigned copy unpacked before
        assert s.report.signature["verified"] is True
    with pytest.raises(SignatureError, match="not signed"):
        load(plain, tmp_path, trusted_keys=[built["pub"]])


def _tar(path: Path, entries: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("case", ["huge", "late", "twice"])
def test_hostile_archive_signatures_are_refused(signed: Path, tmp_path: Path, case: str) -> None:
    manifest = (signed / "manifest.json").read_bytes()
    sig = (signed / SIGNATURE_NAME).read_bytes()
    files = sorted(p.relative_to(signed).as_posix() for p in signed.rglob("*") if p.is_file())
    pinned = [(f, (signed / f).read_bytes()) for f in files if f not in ("manifest.json", SIGNATURE_NAME)]
    entries = {
        "huge": [("manifest.json", manifest), (SIGNATURE_NAME, sig + b" " * (2 << 20)), *pinned],
        "late": [("manifest.json", manifest), *pinned, (SIGNATURE_NAME, sig)],
        "twice": [("manifest.json", manifest), (SIGNATURE_NAME, sig), (SIGNATURE_NAME, sig), *pinned],
    }[case]
    archive = tmp_path / "hostile.trtx"
    _tar(archive, entries)
    expected = {"huge": "a signature of", "late": "right after manifest.json", "twice": "appears twice"}[case]
    with pytest.raises(ArchiveError, match=expected):
        runtime_shim.load(archive, app="t", cache_dir=tmp_path / "cache")
    r = cli("unpack", archive, "-o", tmp_path / "out")
    assert r.exit_code == 1 and expected in r.stderr and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- load()
def test_pins_are_checked_before_any_other_file_is_read(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    """The fallback path: with a foreign key the load stops at the signature, not at the weights it never reads."""
    shutil.rmtree(signed / "weights")
    with pytest.raises(SignatureError, match="signed by another key"):
        load(signed, tmp_path, trusted_keys=[built["other_pub"]], fallback="onnxruntime")


def test_load_with_trusted_key_as_path_or_bytes(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    for key in (built["pub"], str(built["pub"]), built["pub"].read_bytes()):
        with load(signed, tmp_path, trusted_keys=[built["other_pub"], key]) as s:
            assert s.backend == "onnxruntime" and s.report.signature["verified"] is True
            assert any(line.startswith("signature: verified (key sha256:") for line in s.report.lines())
    with pytest.raises(SignatureError, match="not a PEM public key"):
        load(signed, tmp_path, trusted_keys=[built["key"]])


def test_report_says_signed_or_unsigned_without_pins(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    with load(built["bundle"], tmp_path) as s:
        assert s.report.signature == {**s.report.signature, "present": False, "verified": None}
        assert "signature: none (the bundle is not signed)" in s.report.lines()
    with load(signed, tmp_path) as s:
        assert s.report.signature["present"] is True and s.report.signature["verified"] is None
        assert s.report.to_dict()["signature"]["present"] is True


def test_the_core_does_not_import_model_signing(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    code = (
        "import sys, runtime_shim; s = runtime_shim.load(sys.argv[1], app='t', cache_dir=sys.argv[2]); "
        "assert s.report.signature['present']; assert 'model_signing' not in sys.modules, 'imported'; "
        "assert 'cryptography' not in sys.modules, 'imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(signed), str(tmp_path / "c")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- merge
@pytest.fixture(scope="module")
def merge_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("merge"))


def _signed_copy(src: Path, dest: Path, key: Path) -> Path:
    shutil.copytree(src, dest)
    sign_bundle(dest, private_key=key)
    return dest


def test_merge_removes_the_signature_and_says_so(built: dict[str, Path], merge_bundle: Path, tmp_path: Path) -> None:
    bundle = _signed_copy(merge_bundle, tmp_path / "bundle", built["key"])
    part = make_part(tmp_path / "p1", bundle)
    r = CliRunner().invoke(main, ["merge", str(bundle), str(part), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["signature_removed"] is True
    assert "signature (manifest.sig) does not cover the merged manifest and was removed" in r.stderr
    assert not (bundle / SIGNATURE_NAME).exists()
    assert cli("verify", bundle).exit_code == 0
    # Signing after the merge is the expected flow.
    assert cli("sign", bundle, "--key", built["key"]).exit_code == 0
    assert verify_bundle_signature(bundle, [built["pub"]]).verified
    # A merge that changes nothing keeps the signature.
    again = merge_parts(bundle, [part])
    assert not again.signature_removed and (bundle / SIGNATURE_NAME).exists()


def test_merge_without_atomic_exchange_removes_the_signature_too(
    built: dict[str, Path], merge_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bundler.merge_commit as merge_commit

    monkeypatch.setattr(merge_commit, "_exchange", lambda a, b: False)
    bundle = _signed_copy(merge_bundle, tmp_path / "bundle", built["key"])
    report = merge_parts(bundle, [make_part(tmp_path / "p1", bundle)])
    assert report.signature_removed and not (bundle / SIGNATURE_NAME).exists()
    assert not [p for p in bundle.parent.iterdir() if ".merge-" in p.name]


def test_merge_to_a_new_directory_leaves_the_signed_bundle_signed(
    built: dict[str, Path], merge_bundle: Path, tmp_path: Path
) -> None:
    bundle = _signed_copy(merge_bundle, tmp_path / "bundle", built["key"])
    report = merge_parts(bundle, [make_part(tmp_path / "p1", bundle)], out=tmp_path / "merged")
    assert report.signature_removed and report.to_dict()["signature_removed"] is True
    assert verify_bundle_signature(bundle, [built["pub"]]).verified
    assert not (tmp_path / "merged" / SIGNATURE_NAME).exists()


# --------------------------------------------------------------------------- sign's arguments and refusals
def test_sign_arguments(built: dict[str, Path], tmp_path: Path) -> None:
    bundle = built["bundle"]
    for args in ((), ("--key", built["key"], "--keyless"), ("--key", built["key"], "--identity-token", "t")):
        r = cli("sign", bundle, *args)
        assert r.exit_code == 2, (args, r.output)
    assert cli("verify", bundle, "--identity", "someone").exit_code == 2
    assert cli("verify", bundle, "--key", built["pub"], "--identity", "a", "--issuer", "b").exit_code == 2
    assert not (bundle / SIGNATURE_NAME).exists()


def test_keyless_without_sigstore_fails_cleanly(built: dict[str, Path], tmp_path: Path) -> None:
    """Not a real keyless signing (no network, no OIDC token here): a bogus token fails with one ERROR line."""
    bundle = tmp_path / "b"
    shutil.copytree(built["bundle"], bundle)
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xc"), "XDG_DATA_HOME": str(tmp_path / "xd")}
    r = cli("sign", bundle, "--keyless", "--identity-token", "not-a-token", env=env)
    assert r.exit_code == 1 and "ERROR" in r.stderr and "keyless signing failed" in r.stderr, r.output
    assert "Sigstore" in r.stderr and not (bundle / SIGNATURE_NAME).exists()
    r = cli("sign", bundle, "--keyless", env={**env, "SIGSTORE_ID_TOKEN": "not-a-token-either"})
    assert r.exit_code == 1 and "keyless signing failed" in r.stderr


def test_sign_refuses_what_it_cannot_sign(built: dict[str, Path], tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(built["bundle"], bundle)
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cases = {
        rsa_key: "elliptic-curve keys",
        built["pub"]: "not a PEM private key",
        tmp_path / "missing.pem": "private key not found",
    }
    for key, expected in cases.items():
        r = cli("sign", bundle, "--key", key)
        assert r.exit_code == 1 and expected in r.stderr and "hint:" in r.stderr, r.output
    archive = tmp_path / "b.trtx"
    assert cli("pack", bundle, "-o", archive).exit_code == 0
    r = cli("sign", archive, "--key", built["key"])
    assert r.exit_code == 1 and "sign the bundle directory, then pack it" in r.stderr
    (weights,) = (bundle / "weights").iterdir()
    weights.write_bytes(weights.read_bytes()[:-1])
    r = cli("sign", bundle, "--key", built["key"])
    assert r.exit_code == 1 and "cannot sign" in r.stderr
    assert not (bundle / SIGNATURE_NAME).exists()


def test_sign_again_replaces_the_signature_atomically(built: dict[str, Path], signed: Path) -> None:
    r = cli("sign", signed, "--key", built["other"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["replaced"] is True
    assert cli("verify", signed, "--key", built["other_pub"]).exit_code == 0
    assert cli("verify", signed, "--key", built["pub"]).exit_code == 1
    assert not [p for p in os.listdir(signed) if p.endswith(".tmp")]


# --------------------------------------------------------------------------- signatures of the wrong kind or scope
def test_key_and_keyless_signatures_are_not_confused(built: dict[str, Path], signed: Path, tmp_path: Path) -> None:
    """Checked before any network use: a key-made signature is refused for a keyless identity, and the reverse."""
    r = cli("verify", signed, "--identity", "https://github.com/o/r/.github/workflows/w.yml@refs/heads/main")
    assert r.exit_code == 2  # --issuer missing
    r = cli("verify", signed, "--identity", "me@example.com", "--issuer", "https://accounts.example.com", "--json")
    (problem,) = json.loads(r.stdout)["problems"]
    assert r.exit_code == 1 and "made with a key pair" in problem["message"]
    doc = json.loads((signed / SIGNATURE_NAME).read_bytes())
    doc["verificationMaterial"] = {"certificate": {"rawBytes": base64.b64encode(b"not a certificate").decode()}}
    (signed / SIGNATURE_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match=r"keyless \(Sigstore certificate\) signature"):
        load(signed, tmp_path, trusted_keys=[built["pub"]])


def test_a_signature_over_more_than_the_manifest_is_refused(
    built: dict[str, Path], signed: Path, tmp_path: Path
) -> None:
    """A genuine signature by the trusted key, but over a directory holding manifest.json and something else."""
    from model_signing import hashing, signing

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(signed / "manifest.json", model / "manifest.json")
    (model / "other.bin").write_bytes(b"more")
    config = signing.Config().use_elliptic_key_signer(private_key=built["key"])
    config.set_hashing_config(hashing.Config().use_file_serialization(hashing_algorithm="sha256"))
    config.sign(model, signed / SIGNATURE_NAME)
    with pytest.raises(SignatureError, match=r"signs 2 file\(s\), not manifest.json alone"):
        load(signed, tmp_path, trusted_keys=[built["pub"]])


def test_a_merge_that_fails_at_the_manifest_keeps_the_signature(
    built: dict[str, Path], merge_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the atomic exchange, the signature is set aside before the manifest is replaced: and put back if
    the replace fails, since the old manifest stays."""
    import bundler.merge_commit as merge_commit
    from bundler.merge import MergeError

    bundle = _signed_copy(merge_bundle, tmp_path / "bundle", built["key"])
    real_write = merge_commit.atomic_write

    def full_disk_at_the_bundle(path, data) -> None:
        if Path(path).parent.resolve() == bundle.resolve():
            raise OSError(28, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(merge_commit, "_exchange", lambda a, b: False)
    monkeypatch.setattr(merge_commit, "atomic_write", full_disk_at_the_bundle)
    with pytest.raises(MergeError, match="No space left"):
        merge_parts(bundle, [make_part(tmp_path / "p1", bundle)])
    assert verify_bundle_signature(bundle, [built["pub"]]).verified


def test_a_rebuild_that_changes_the_manifest_removes_the_signature_and_says_so(
    built: dict[str, Path], signed: Path
) -> None:
    model = built["root"] / "m" / "mlp.onnx"
    same = cli("build", model, "-o", signed, "--shape", "x=1x64:4x64:16x64", "--no-weightful", "--force", "-q")
    assert same.exit_code == 0, same.output
    assert (signed / SIGNATURE_NAME).is_file(), "the same manifest bytes: the signature still holds"
    assert verify_bundle_signature(signed, [built["pub"]]).verified
    other = cli("build", model, "-o", signed, "--shape", "x=1x64:8x64:32x64", "--no-weightful", "--force")
    assert other.exit_code == 0, other.output
    assert not (signed / SIGNATURE_NAME).exists()
    assert f"removed {SIGNATURE_NAME}" in other.stderr and "sign the bundle again" in other.stderr


def test_a_bundle_of_several_models_is_signed_once_for_all(built: dict[str, Path], tmp_path: Path) -> None:
    from bundler.build import ModelSpec, build_bundle
    from bundler.config import BuildOptions

    a, b = models.make_mlp(tmp_path / "a"), models.make_fixed(tmp_path / "b")
    bundle = tmp_path / "pipeline"
    batch = models.as_profiles({"x": ((1, 64), (4, 64), (16, 64))})
    specs = [ModelSpec(source=a, name="first", profiles=batch), ModelSpec(source=b, name="second")]
    build_bundle(None, bundle, options=BuildOptions(weightful=False, weightless=False), models=specs)
    r = cli("sign", bundle, "--key", built["key"])
    assert r.exit_code == 0, r.output
    assert cli("verify", bundle, "--key", built["pub"]).exit_code == 0
    for name in ("first", "second"):
        with load(bundle, tmp_path, model=name, trusted_keys=[built["pub"]]) as s:
            assert s.report.signature["verified"] is True
    with pytest.raises(SignatureError):
        load(bundle, tmp_path, model="second", trusted_keys=[built["other_pub"]])


def test_a_manifest_swapped_in_after_the_signature_check_is_refused(
    built: dict[str, Path], signed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load() parses the very bytes whose signature it checked: a manifest replaced between the two reads is refused."""
    from runtime_shim import session

    forged = json.loads((signed / "manifest.json").read_text())
    forged["models"][0]["version"] = "forged"
    real_check = session.check_signature

    def check_then_swap(bundle_dir, keys):
        status = real_check(bundle_dir, keys)
        (Path(bundle_dir) / "manifest.json").write_text(json.dumps(forged))  # a writer racing the load
        return status

    monkeypatch.setattr(session, "check_signature", check_then_swap)
    with pytest.raises(SignatureError, match="changed between its signature check and its reading"):
        load(signed, tmp_path, trusted_keys=[built["pub"]])
