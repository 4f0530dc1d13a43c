"""`trtx-bundle upgrade`: a schema 1 bundle (frames pinned by sha256) rewritten as schema 2 with BLAKE3 frame digests,
in place and atomically; a damaged bundle refused and left as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import runtime_shim
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest
from runtime_shim.schema import canonical_json
from runtime_shim.signing import SIGNATURE_NAME
from runtime_shim.store.digest import digest_function

sys.path.insert(0, str(Path(__file__).parent))
import models

import bundler.upgrade as upgrade_mod
from bundler.cli import main

PROFILE = {"x": ((1, 64), (4, 64), (16, 64))}


def cli(*args: str | Path):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def to_schema_1(v2: dict[str, Any], weight_file: bytes) -> dict[str, Any]:
    """A schema 2 manifest of one model as schema 1 wrote it: the model's records at the top level, its tensors in
    ``weights``, its parser verdict in ``trt_rtx``, and each frame pinned by the sha256 of its stored bytes."""
    (m,) = v2["models"]
    out: dict[str, Any] = {"schema_version": 1, "creator": v2["creator"]}
    out["model"] = {k: m[k] for k in ("name", "version", "source_sha256", "opset") if k in m}
    for k in ("inputs", "outputs", "profiles", "warmup_shapes", "skeleton", "engines", "runtime_caches"):
        if k in m:
            out[k] = m[k]
    out["trt_rtx"] = dict(v2["trt_rtx"], **({"parse": m["parse"]} if "parse" in m else {}))
    weights = {k: v for k, v in v2["weights"].items() if k not in ("frame_digest", "blobs")}
    weights["blobs"] = [
        dict(
            blob,
            frames=[
                {
                    "offset": f["offset"],
                    "size": f["size"],
                    "raw_size": f["raw_size"],
                    "sha256": hashlib.sha256(weight_file[f["offset"] : f["offset"] + f["size"]]).hexdigest(),
                }
                for f in blob["frames"]
            ],
        )
        for blob in v2["weights"]["blobs"]
    ]
    weights["tensors"] = m["tensors"]
    out["weights"] = weights
    return out


def with_sha256_frames(v2: dict[str, Any], weight_file: bytes) -> dict[str, Any]:
    """The same schema 2 manifest with its frames pinned by sha256 (what a writer with frame_digest="sha256" makes)."""
    doc = json.loads(json.dumps(v2))
    doc["weights"]["frame_digest"] = "sha256"
    for blob in doc["weights"]["blobs"]:
        for f in blob["frames"]:
            f["digest"] = hashlib.sha256(weight_file[f["offset"] : f["offset"] + f["size"]]).hexdigest()
    return doc


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def outputs(bundle: Path, feeds: dict[str, np.ndarray], cache: Path) -> list[np.ndarray]:
    with runtime_shim.load(bundle, "T", cache_dir=cache) as s:
        assert s.backend == "onnxruntime"
        got = s.run(feeds)
        return [got[name] for name in sorted(got)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An MLP bundled by the CLI (schema 2, BLAKE3 frames; no engine: the ONNX Runtime fallback runs it), the same
    bundle rewritten as schema 1, and the original model's outputs from ONNX Runtime."""
    root = tmp_path_factory.mktemp("upgrade")
    model = models.make_mlp(root / "m")
    r = cli("build", model, "-o", root / "v2", "--shape", "x=1x64:4x64:16x64", "--no-weightful", "-q")
    assert r.exit_code == 0, r.output
    v2_bytes = (root / "v2" / MANIFEST_NAME).read_bytes()
    v2 = json.loads(v2_bytes)
    assert v2["schema_version"] == 2 and v2["weights"]["frame_digest"] == "blake3"
    weight_file = (root / "v2" / v2["weights"]["file"]["path"]).read_bytes()
    shutil.copytree(root / "v2", root / "v1")
    (root / "v1" / MANIFEST_NAME).write_bytes(canonical_json(to_schema_1(v2, weight_file)))
    feeds = models.sample_inputs("mlp", PROFILE, model)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(None, feeds)))
    return {
        "root": root,
        "v1": root / "v1",
        "v2_bytes": v2_bytes,
        "v2": v2,
        "weight_file": weight_file,
        "feeds": feeds,
        "want": [want[n] for n in sorted(want)],
    }


@pytest.fixture
def v1(built: dict[str, Any], tmp_path: Path) -> Path:
    """A fresh copy of the schema 1 bundle."""
    shutil.copytree(built["v1"], tmp_path / "b")
    return tmp_path / "b"


def test_a_schema_1_bundle_loads_as_it_is(built: dict[str, Any], tmp_path: Path) -> None:
    doc = json.loads((built["v1"] / MANIFEST_NAME).read_bytes())
    assert doc["schema_version"] == 1 and "sha256" in doc["weights"]["blobs"][0]["frames"][0]
    for got, want in zip(outputs(built["v1"], built["feeds"], tmp_path / "c"), built["want"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_upgrade_rewrites_only_the_manifest(built: dict[str, Any], v1: Path, tmp_path: Path) -> None:
    before = snapshot(v1)
    r = cli("upgrade", v1, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["upgraded"] and res["schema_before"] == 1 and res["schema_after"] == 2
    assert res["frame_digest_before"] == "sha256" and res["frame_digest_after"] == "blake3"
    assert res["signature_removed"] is False
    assert res["frames"] == sum(len(b["frames"]) for b in built["v2"]["weights"]["blobs"]) > 0
    after = snapshot(v1)
    assert set(after) == set(before), "no file added or left behind"
    assert {k: v for k, v in after.items() if k != MANIFEST_NAME} == {
        k: v for k, v in before.items() if k != MANIFEST_NAME
    }, "every other file keeps its bytes"
    # Schema 2 with BLAKE3 pins: exactly what the bundler writes for this model today.
    assert after[MANIFEST_NAME] == built["v2_bytes"]
    assert res["manifest_sha256_after"] == hashlib.sha256(built["v2_bytes"]).hexdigest()
    doc = json.loads(after[MANIFEST_NAME])
    blake3 = digest_function("blake3")
    for blob in doc["weights"]["blobs"]:
        for f in blob["frames"]:
            assert f["digest"] == blake3(built["weight_file"][f["offset"] : f["offset"] + f["size"]])
    assert cli("verify", v1).exit_code == 0
    for got, want in zip(outputs(v1, built["feeds"], tmp_path / "c"), built["want"], strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_bundle_with_an_engine_upgrades_too(tmp_path: Path) -> None:
    """Engines stay with their model through schema 1 and back; their files keep their bytes."""
    model = models.make_mlp(tmp_path / "m")
    r = cli("build", model, "-o", tmp_path / "b", "--shape", "x=1x64:4x64:16x64", "--sm", "89", "-q")
    assert r.exit_code == 0, r.output
    built = (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    v2 = json.loads(built)
    assert v2["models"][0]["engines"], "a weightful engine was built"
    weight_file = (tmp_path / "b" / v2["weights"]["file"]["path"]).read_bytes()
    (tmp_path / "b" / MANIFEST_NAME).write_bytes(canonical_json(to_schema_1(v2, weight_file)))
    before = snapshot(tmp_path / "b")
    assert cli("upgrade", tmp_path / "b", "-q").exit_code == 0
    after = snapshot(tmp_path / "b")
    assert after[MANIFEST_NAME] == built
    assert {k: v for k, v in after.items() if k != MANIFEST_NAME} == {
        k: v for k, v in before.items() if k != MANIFEST_NAME
    }


def test_upgrade_is_idempotent(v1: Path) -> None:
    assert cli("upgrade", v1, "-q").exit_code == 0
    upgraded = snapshot(v1)
    mtime = (v1 / MANIFEST_NAME).stat().st_mtime_ns
    again = cli("upgrade", v1)
    assert again.exit_code == 0 and "already up to date" in again.stdout
    assert snapshot(v1) == upgraded and (v1 / MANIFEST_NAME).stat().st_mtime_ns == mtime, "nothing written"
    as_json = json.loads(cli("upgrade", v1, "--json").stdout)
    assert as_json["upgraded"] is False and as_json["frames"] == 0


def test_a_built_bundle_is_already_up_to_date(built: dict[str, Any], tmp_path: Path) -> None:
    shutil.copytree(built["root"] / "v2", tmp_path / "b")
    r = cli("upgrade", tmp_path / "b")
    assert r.exit_code == 0 and "already up to date" in r.stdout
    assert (tmp_path / "b" / MANIFEST_NAME).read_bytes() == built["v2_bytes"]


def test_schema_2_with_sha256_frames_is_repinned(built: dict[str, Any], tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(built["root"] / "v2", b)
    (b / MANIFEST_NAME).write_bytes(canonical_json(with_sha256_frames(built["v2"], built["weight_file"])))
    BundleManifest.from_json((b / MANIFEST_NAME).read_bytes())  # a valid manifest as it is
    r = cli("upgrade", b, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["schema_before"] == 2 and res["frame_digest_before"] == "sha256" and res["upgraded"]
    assert (b / MANIFEST_NAME).read_bytes() == built["v2_bytes"]


def test_a_damaged_bundle_is_refused_and_untouched(built: dict[str, Any], v1: Path) -> None:
    rel = built["v2"]["weights"]["file"]["path"]
    frame = built["v2"]["weights"]["blobs"][0]["frames"][0]
    data = bytearray((v1 / rel).read_bytes())
    data[frame["offset"] + frame["size"] // 2] ^= 0x01
    (v1 / rel).write_bytes(data)
    before = snapshot(v1)
    r = cli("upgrade", v1)
    assert r.exit_code == 1
    assert "ERROR" in r.stderr and rel in r.stderr and "damaged" in r.stderr
    assert snapshot(v1) == before


def test_a_missing_file_is_refused_and_untouched(built: dict[str, Any], v1: Path) -> None:
    rel = built["v2"]["models"][0]["skeleton"]["file"]["path"]
    (v1 / rel).unlink()
    before = snapshot(v1)
    r = cli("upgrade", v1)
    assert r.exit_code == 1 and rel in r.stderr and "missing" in r.stderr
    assert snapshot(v1) == before


def test_a_frame_changed_after_verify_is_never_repinned(
    built: dict[str, Any], v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes that changed between verify and the re-pinning (a race) fail their old sha256 as they are read."""
    rel = built["v2"]["weights"]["file"]["path"]
    frame = built["v2"]["weights"]["blobs"][-1]["frames"][-1]
    real_verify = upgrade_mod.verify_bundle

    def verify_then_change(root: Path) -> list:
        problems = real_verify(root)
        data = bytearray((root / rel).read_bytes())
        data[frame["offset"]] ^= 0xFF
        (root / rel).write_bytes(data)
        return problems

    monkeypatch.setattr(upgrade_mod, "verify_bundle", verify_then_change)
    manifest = (v1 / MANIFEST_NAME).read_bytes()
    r = cli("upgrade", v1)
    assert r.exit_code == 1 and "sha256" in r.stderr and "changed nothing" in r.stderr
    assert (v1 / MANIFEST_NAME).read_bytes() == manifest


def test_an_interrupted_write_leaves_the_old_manifest_and_signature(
    v1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (v1 / SIGNATURE_NAME).write_bytes(b"the signature of the schema 1 manifest")
    before = snapshot(v1)
    real = os.replace

    def fail_on_manifest(src: Any, dst: Any) -> None:
        if Path(dst).name == MANIFEST_NAME:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_manifest)
    r = cli("upgrade", v1)
    monkeypatch.undo()
    assert r.exit_code == 1 and MANIFEST_NAME in r.stderr and "left as it was" in r.stderr
    assert snapshot(v1) == before, "old manifest, its signature back in place, no temp file left"


def test_upgrading_removes_the_signature(built: dict[str, Any], v1: Path, tmp_path: Path) -> None:
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from bundler.sign import sign_bundle

    private = ec.generate_private_key(ec.SECP256R1())
    key, pub = tmp_path / "key.pem", tmp_path / "pub.pem"
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    sign_bundle(v1, private_key=key)
    assert cli("verify", v1, "--key", pub).exit_code == 0
    r = cli("upgrade", v1, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["signature_removed"] is True
    assert SIGNATURE_NAME in r.stderr and "sign" in r.stderr
    assert not (v1 / SIGNATURE_NAME).exists()
    assert sorted(p.name for p in v1.iterdir() if p.name.startswith(".")) == [], "nothing set aside is left"
    assert cli("verify", v1).exit_code == 0
    assert cli("verify", v1, "--key", pub).exit_code == 1, "unsigned now: sign it again"


def test_unknown_keys_are_not_dropped(built: dict[str, Any], v1: Path) -> None:
    doc = json.loads((v1 / MANIFEST_NAME).read_bytes())
    doc["made_by_a_newer_minor"] = {"x": 1}
    (v1 / MANIFEST_NAME).write_bytes(canonical_json(doc))
    before = snapshot(v1)
    r = cli("upgrade", v1)
    assert r.exit_code == 1 and "made_by_a_newer_minor" in r.stderr
    assert snapshot(v1) == before


def test_an_archive_or_a_missing_directory_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "model.trtx"
    archive.write_bytes(b"not a directory")
    for target in (archive, tmp_path / "absent"):
        r = cli("upgrade", target)
        assert r.exit_code == 1 and "not a bundle directory" in r.stderr and "unpack" in r.stderr
