"""verify names every kind of damage; pack is deterministic; unpack refuses hostile archives and writes nothing outside."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from bundler.archive import pack_bundle, unpack_bundle
from bundler.build import build_bundle
from bundler.bundle_io import describe_bundle, verify_bundle
from bundler.config import make_options
from runtime_shim.errors import ArchiveError, IntegrityError
from runtime_shim.manifest import MANIFEST_NAME, read_bundle_manifest, read_manifest
from tests import models


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("io")
    model = models.make_mlp(root / "models")
    build_bundle(
        model,
        root / "bundle",
        options=make_options(shapes=["x=1x64:4x64:16x64"], sms=[86, 89]),
        probe=lambda: SimpleNamespace(gpus=()),
    )
    return root / "bundle"


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(bundle, dest)
    return dest


def _engine(b: Path) -> Path:
    (path,) = (b / "engines").iterdir()
    return path


def test_intact_bundle_verifies(bundle: Path) -> None:
    assert verify_bundle(bundle) == []


def test_changed_file(copy: Path) -> None:
    engine = _engine(copy)
    data = bytearray(engine.read_bytes())
    data[100] ^= 1
    engine.write_bytes(bytes(data))
    (p,) = verify_bundle(copy)
    assert (p.kind, p.path) == (
        "changed",
        engine.relative_to(copy).as_posix(),
    ) and "engines[0].file.sha256" in p.message


def test_missing_file(copy: Path) -> None:
    (store,) = (copy / "weights").iterdir()
    store.unlink()
    (p,) = verify_bundle(copy)
    assert (p.kind, p.path) == ("missing", f"weights/{store.name}") and "weights.file" in p.message


def test_truncated_file(copy: Path) -> None:
    engine = _engine(copy)
    size = engine.stat().st_size
    with open(engine, "r+b") as f:
        f.truncate(size // 2)
    (p,) = verify_bundle(copy)
    assert p.kind == "truncated" and p.path.endswith(engine.name) and f"{size // 2} bytes, expected {size}" in p.message


def test_grown_file(copy: Path) -> None:
    with open(_engine(copy), "ab") as f:
        f.write(b"x")
    assert [p.kind for p in verify_bundle(copy)] == ["size"]


def test_extra_files_and_links(copy: Path) -> None:
    (copy / "stray.bin").write_bytes(b"?")
    (copy / "engines" / "link").symlink_to("/etc/passwd")
    problems = verify_bundle(copy)
    assert sorted((p.kind, p.path) for p in problems) == [("extra", "engines/link"), ("extra", "stray.bin")]


def test_pinned_file_replaced_by_a_link(copy: Path) -> None:
    engine = _engine(copy)
    target = copy.parent / "elsewhere.engine"
    engine.rename(target)
    engine.symlink_to(target)
    (p,) = verify_bundle(copy)
    assert p.kind == "not-a-file"


def test_newer_schema_is_refused_with_a_hint(copy: Path) -> None:
    data = json.loads((copy / MANIFEST_NAME).read_text())
    data["schema_version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    (p,) = verify_bundle(copy)
    assert p.kind == "schema" and "schema_version 99 is newer" in p.message and "upgrade" in p.hint


def test_broken_manifest(copy: Path) -> None:
    (copy / MANIFEST_NAME).write_text('{"schema_version": 2, "models": [{}]}')
    (p,) = verify_bundle(copy)
    assert p.kind == "schema" and "trt_rtx: missing" in p.message
    (copy / MANIFEST_NAME).unlink()
    (p,) = verify_bundle(copy)
    assert p.kind == "schema" and "not found" in p.message


def test_describe(bundle: Path) -> None:
    d = describe_bundle(bundle)
    w = d["weights"]
    assert w["raw_bytes"] > 0 and w["stored_bytes"] > 0 and w["ratio"] == round(w["raw_bytes"] / w["stored_bytes"], 3)
    assert d["inputs"][0]["name"] == "x" and len(d["engines"]) == 1 and d["runtime_caches"] == []


# --------------------------------------------------------------------------- pack / unpack
def test_pack_is_deterministic_and_round_trips(bundle: Path, tmp_path: Path) -> None:
    a = pack_bundle(bundle, tmp_path / "a.trtx")
    b = pack_bundle(bundle, tmp_path / "b.trtx")
    assert a.path.read_bytes() == b.path.read_bytes()
    with tarfile.open(a.path) as tar:
        members = tar.getmembers()
    assert members[0].name == MANIFEST_NAME and [m.name for m in members[1:]] == sorted(m.name for m in members[1:])
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
    manifest = unpack_bundle(a.path, tmp_path / "out")
    assert manifest == read_bundle_manifest(bundle)[0]

    def files(root: Path) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(tmp_path / "out") == files(bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.trtx", "b.trtx", "out"]


def test_pack_refuses_a_damaged_bundle_and_leaves_extras_out(copy: Path, tmp_path: Path) -> None:
    (copy / "notes.txt").write_text("x")
    result = pack_bundle(copy, tmp_path / "ok.trtx")
    assert result.left_out == ("notes.txt",)
    with tarfile.open(result.path) as tar:
        assert "notes.txt" not in tar.getnames()
    _engine(copy).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        pack_bundle(copy, tmp_path / "bad.trtx")
    assert not (tmp_path / "bad.trtx").exists()


def _hostile(tmp_path: Path, bundle: Path, add) -> Path:
    """A real packed bundle with one extra (hostile) entry appended by ``add(tar)``."""
    good = pack_bundle(bundle, tmp_path / "good.trtx").path
    bad = tmp_path / "bad.trtx"
    with tarfile.open(good) as src, tarfile.open(bad, "w", format=tarfile.GNU_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        add(dst)
    return bad


def _entry(
    name: str, type_: bytes = tarfile.REGTYPE, data: bytes = b"", linkname: str = ""
) -> tuple[tarfile.TarInfo, io.BytesIO | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type_, linkname, len(data) if type_ == tarfile.REGTYPE else 0
    return info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None


HOSTILE = {
    "absolute": (lambda: _entry("/tmp/evil-absolute", data=b"x"), "/tmp/evil-absolute", "absolute path"),
    "dotdot": (lambda: _entry("engines/../../evil-dotdot", data=b"x"), "engines/../../evil-dotdot", "'..'"),
    "symlink": (
        lambda: _entry("engines/" + "a" * 64 + ".engine", tarfile.SYMTYPE, linkname="/etc/passwd"),
        "symbolic link",
        "symbolic link",
    ),
    "hardlink": (
        lambda: _entry("weights/" + "b" * 64 + ".trtxw", tarfile.LNKTYPE, linkname="/etc/passwd"),
        "hard link",
        "hard link",
    ),
    "device": (
        lambda: _entry("caches/" + "c" * 64 + ".cache", tarfile.CHRTYPE),
        "caches/" + "c" * 64 + ".cache",
        "device file",
    ),
    "fifo": (lambda: _entry("fifo", tarfile.FIFOTYPE), "'fifo'", "fifo"),
    "stray": (lambda: _entry("evil.sh", data=b"#!/bin/sh"), "'evil.sh'", "not a bundle file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_write_nothing(bundle: Path, tmp_path: Path, case: str) -> None:
    make, name_part, reason = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    archive = _hostile(work, bundle, lambda tar: tar.addfile(*make()))
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with pytest.raises(ArchiveError) as e:
        unpack_bundle(archive, work / "sub" / "out")
    assert name_part in str(e.value) and reason in str(e.value)
    assert not (work / "sub" / "out").exists() and list((work / "sub").iterdir()) == []
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert (
        not Path("/tmp/evil-absolute").exists()
        and not (tmp_path / "evil-dotdot").exists()
        and not (work / "evil-dotdot").exists()
    )


def test_duplicate_entry_is_refused(bundle: Path, tmp_path: Path) -> None:
    archive = _hostile(tmp_path, bundle, lambda tar: tar.addfile(*_entry(MANIFEST_NAME, data=b"{}")))
    with pytest.raises(ArchiveError, match="appears twice"):
        unpack_bundle(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tampered_archive_fails_verification(bundle: Path, tmp_path: Path) -> None:
    good = pack_bundle(bundle, tmp_path / "good.trtx").path
    data = bytearray(good.read_bytes())
    data[-20000] ^= 0xFF  # inside the last file's data (the tar ends with 10 KiB of padding at most)
    (tmp_path / "bad.trtx").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="problem"):
        unpack_bundle(tmp_path / "bad.trtx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.trtx", "good.trtx"]


def test_unpack_refuses_non_empty_target_and_non_archives(bundle: Path, tmp_path: Path) -> None:
    archive = pack_bundle(bundle, tmp_path / "b.trtx").path
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("k")
    with pytest.raises(ArchiveError, match="not an empty directory"):
        unpack_bundle(archive, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep"]
    (tmp_path / "junk.trtx").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ArchiveError, match="not a bundle archive|corrupt"):
        unpack_bundle(tmp_path / "junk.trtx", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    unpack_bundle(archive, tmp_path / "empty")  # an existing empty directory is fine
    assert verify_bundle(tmp_path / "empty") == []


def test_unpack_into_the_current_empty_directory_keeps_it(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = pack_bundle(bundle, tmp_path / "b.trtx").path
    (tmp_path / "here").mkdir()
    inode = (tmp_path / "here").stat().st_ino
    monkeypatch.chdir(tmp_path / "here")
    unpack_bundle(archive, ".")
    assert Path.cwd().stat().st_ino == inode and verify_bundle(".") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.trtx", "here"]


def test_new_directories_get_the_usual_mode(bundle: Path, tmp_path: Path) -> None:
    import os
    import stat as st

    umask = os.umask(0o022)
    try:
        unpack_bundle(pack_bundle(bundle, tmp_path / "b.trtx").path, tmp_path / "out")
    finally:
        os.umask(umask)
    assert st.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert st.S_IMODE(bundle.stat().st_mode) == 0o777 & ~umask


def test_engine_header_check_where_a_gpu_is_present(bundle: Path) -> None:
    """Stands in for TRT-RTX's get_engine_validity (needs a supported GPU): only file defects are problems."""
    seen: list[bytes] = []

    def wrong_sm(header: bytes) -> tuple[str, int]:
        seen.append(header)
        return "INVALID", 2  # UNSUPPORTED_CC: the engine is fine, this GPU is not its target

    assert verify_bundle(bundle, header_check=wrong_sm) == [] and len(seen) == 1 and len(seen[0]) == 64
    (p,) = verify_bundle(bundle, header_check=lambda h: ("INVALID", 32 | 2))
    assert p.kind == "engine" and "malformed engine" in p.message and p.path.startswith("engines/")


def test_verify_decodes_every_frame_like_load_does(copy: Path) -> None:
    """A frame changed and the weight file re-pinned as a whole (new name, sha256 and size in the manifest) passes
    the file checks; verify must still find it, as load() would, by the frame's own sha256."""
    import hashlib

    m, _ = read_manifest(copy)
    old = copy / m.weights.file.path
    data = bytearray(old.read_bytes())
    frame = m.weights.blobs[0].frames[0]
    data[frame.offset + frame.size // 2] ^= 0x01
    sha = hashlib.sha256(data).hexdigest()
    new_rel = f"weights/{sha}{old.suffix}"
    old.unlink()
    (copy / new_rel).write_bytes(data)
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    doc["weights"]["file"].update(path=new_rel, sha256=sha)
    (copy / MANIFEST_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True))
    problems = [p for p in verify_bundle(copy) if p.kind != "warning"]
    assert [p.path for p in problems] == [new_rel], problems
    assert "frame" in problems[0].message and "blake3" in problems[0].message


def test_verify_refuses_a_skeleton_re_pinned_to_an_empty_model(copy: Path) -> None:
    """An empty file parses as an empty ModelProto with no external reference: only a look at the model can tell."""
    import hashlib

    m, _ = read_manifest(copy)
    (copy / m.skeleton.file.path).unlink()
    sha = hashlib.sha256(b"").hexdigest()
    rel = f"skeleton/{sha}.onnx"
    (copy / rel).write_bytes(b"")
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    models.model0(doc)["skeleton"]["file"].update(path=rel, sha256=sha, size=0)
    (copy / MANIFEST_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True))
    problems = [p for p in verify_bundle(copy) if p.kind != "warning"]
    assert [p.path for p in problems] == [rel], problems
    assert "not an ONNX model" in problems[0].message and "graph.output" in problems[0].message
