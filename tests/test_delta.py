"""Delta updates on real bundles built by the CLI: diff OLD NEW, apply, byte-identical NEW; hostile updates refused.

NEW variants: (a) a fine-tune (2 of 20 tensors changed, the model rebuilt), (b) a new engine and its runtime cache
(a farm part merged in), (c) one more GPU's runtime cache. Every refusal leaves the old bundle byte for byte as it
was and no temp directory behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import runtime_shim
from bundler.cli import main
from bundler.delta import diff_bundles
from runtime_shim.delta_format import END_MAGIC, START_MAGIC, TRAILER, read_delta
from runtime_shim.errors import BundleError, DeltaError, IntegrityError
from runtime_shim.manifest import read_bundle_manifest
from tests.test_hostile_archives import _fill, tmpfs  # noqa: F401 - tmpfs is a fixture, used by name
from tests.test_merge import RTX5090, make_part, real_engine

REPO = Path(__file__).resolve().parent.parent
LAYERS, WIDTH = 20, 192
SHAPE = f"x=1x{WIDTH}:4x{WIDTH}:16x{WIDTH}"
posix_only = pytest.mark.skipif(os.name != "posix", reason="signals and flock are POSIX")


def deep_model(path: Path, changed: tuple[int, ...] = ()) -> Path:
    """A chain of LAYERS MatMuls (one weight tensor each); ``changed`` layers get fine-tuned weights."""
    rng = np.random.default_rng(5)
    inits, nodes, cur = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) * 0.05).astype(np.float32)
        if i in changed:
            w += (np.random.default_rng(100 + i).standard_normal((WIDTH, WIDTH)) * 0.002).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"layer{i}.weight"))
        nodes.append(helper.make_node("MatMul", [cur, f"layer{i}.weight"], [f"h{i}"], name=f"mm{i}"))
        cur = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def cli(*args: str) -> str:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.stdout


def build(root: Path, name: str, changed: tuple[int, ...] = (), *options: str) -> Path:
    model = deep_model(root / f"{name}-src" / "deep.onnx", changed)
    cli("build", str(model), "-o", str(root / name), "--shape", SHAPE, *options)
    return root / name


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".apply-" in p.name)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("delta")
    b = {
        # (a): weights only; no weightful engine, whose bytes hold the weights (a farm's weightless ones do not)
        "old_a": build(root, "old_a", (), "--no-weightful"),
        "new_a": build(root, "new_a", (3, 11), "--no-weightful"),
        "old": build(root, "old"),
    }
    part_b = make_part(root / "part_b", b["old"], engine=real_engine(b["old"], 89), cache=_cache_bytes(1))
    cli("merge", str(b["old"]), str(part_b), "-o", str(root / "new_b"))
    b["new_b"] = root / "new_b"
    part_c = make_part(root / "part_c", b["new_b"], gpu=RTX5090, cache=_cache_bytes(2))
    cli("merge", str(b["new_b"]), str(part_c), "-o", str(root / "new_c"))
    b["new_c"] = root / "new_c"
    return b


def _cache_bytes(seed: int) -> bytes:
    """Stands in for a runtime cache: 256 KiB of kernels-like bytes (compressible, but not trivially)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 16, 256 << 10, dtype=np.uint8).tobytes()


CASES = {"fine-tune": ("old_a", "new_a"), "new engine": ("old", "new_b"), "one more cache": ("new_b", "new_c")}


@pytest.fixture(scope="module")
def deltas(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("updates")
    out = {}
    for case, (old, new) in CASES.items():
        out[case] = root / f"{case.replace(' ', '-')}.trtxd"
        report = json.loads(cli("diff", str(bundles[old]), str(bundles[new]), "-o", str(out[case]), "--json"))
        assert report["size"] == out[case].stat().st_size
    return out


def old_copy(bundles: dict[str, Path], case: str, where: Path) -> Path:
    shutil.copytree(bundles[CASES[case][0]], where / "bundle")
    return where / "bundle"


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", CASES)
def test_round_trip_with_o_and_in_place(
    bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path, case: str
) -> None:
    old, new = (bundles[k] for k in CASES[case])
    before = tree(old)
    report = json.loads(cli("apply", str(old), str(deltas[case]), "-o", str(tmp_path / "out"), "--json"))
    assert tree(tmp_path / "out") == tree(new)
    assert tree(old) == before and report["reuse"] == "copy" and not report["in_place"]
    for rel in tree(tmp_path / "out"):  # copies: OLD and OUT share no inode
        if (old / rel).exists():
            assert not os.path.samefile(old / rel, tmp_path / "out" / rel)
    bundle = old_copy(bundles, case, tmp_path)
    report = json.loads(cli("apply", str(bundle), str(deltas[case]), "--json"))
    assert tree(bundle) == tree(new), "files only OLD pinned are gone, NEW's are all there"
    assert report["in_place"] and report["reuse"] == "hard link"
    assert leftovers(tmp_path) == []


def test_deltas_hold_only_what_old_lacks(bundles: dict[str, Path], deltas: dict[str, Path]) -> None:
    sizes = {case: deltas[case].stat().st_size for case in CASES}
    new_bytes = {case: sum(len(b) for b in tree(bundles[CASES[case][1]]).values()) for case in CASES}
    # (a): 2 of 20 tensors changed: their frames, the manifest, the skeleton if it changed; nothing else
    old_a, _w, _s = read_bundle_manifest(bundles["old_a"])
    frame = max(f.size for b in old_a.weights.blobs for f in b.frames)
    assert sizes["fine-tune"] < 2 * frame + 64 * 1024 < new_bytes["fine-tune"] / 4
    d = read_delta(deltas["fine-tune"])
    assert d.header.weights is not None
    copied = [op for op in d.header.weights.ops if op.source == "old"]
    assert sum(op.size for op in copied) > 0.85 * d.header.weights.file.size
    # (b), (c): no weight byte travels; (c) is one cache and a manifest
    for case in ("new engine", "one more cache"):
        assert read_delta(deltas[case]).header.weights is None
    assert sizes["one more cache"] < (256 << 10) + 32 * 1024
    assert sizes["new engine"] < new_bytes["new engine"] / 2
    names = [s.name for s in read_delta(deltas["new engine"]).header.sections]
    assert any(n.startswith("engines/") for n in names) and any(n.startswith("caches/") for n in names)


@pytest.mark.parametrize("encoding", ["none", "zstd"])
def test_fine_tune_round_trip_per_encoding(tmp_path: Path, encoding: str) -> None:
    old = build(tmp_path, "old", (), "--no-weightful", "--encoding", encoding)
    new = build(tmp_path, "new", (0, 19), "--no-weightful", "--encoding", encoding)
    r = diff_bundles(old, new, tmp_path / "u.trtxd")
    assert r.weight_frames_copied == r.weight_frames - 2
    got = runtime_shim.apply_update(old, tmp_path / "u.trtxd", tmp_path / "out")
    assert tree(tmp_path / "out") == tree(new) and got.weight_bytes_from_update == r.weight_bytes_literal


def test_multi_model_bundle_one_model_fine_tuned(tmp_path: Path) -> None:
    """Two models in one bundle (one weight store), one of them fine-tuned: the other's frames all come from OLD."""
    from tests import models

    shapes = ["--shape", f"deep.x=1x{WIDTH}:4x{WIDTH}:16x{WIDTH}", "--shape", "mlp.x=1x64:4x64:16x64"]
    for name, changed in (("old", ()), ("new", (7,))):
        deep = deep_model(tmp_path / f"{name}-src" / "deep.onnx", changed)
        mlp = models.make_mlp(tmp_path / f"{name}-src")
        cli("build", str(deep), str(mlp), "-o", str(tmp_path / name), *shapes, "--no-weightful")
    r = diff_bundles(tmp_path / "old", tmp_path / "new", tmp_path / "u.trtxd")
    assert r.weight_frames_copied == r.weight_frames - 1
    runtime_shim.apply_update(tmp_path / "old", tmp_path / "u.trtxd")
    assert tree(tmp_path / "old") == tree(tmp_path / "new")


def test_diff_reads_archives_too(bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path) -> None:
    from bundler.archive import pack_bundle

    old, new = (pack_bundle(bundles[k], tmp_path / f"{k}.trtx").path for k in CASES["fine-tune"])
    cli("diff", str(old), str(new), "-o", str(tmp_path / "u.trtxd"))
    assert (tmp_path / "u.trtxd").read_bytes() == deltas["fine-tune"].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old.name, new.name, "u.trtxd"])


def test_python_api_in_place_and_twice(bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path) -> None:
    bundle = old_copy(bundles, "fine-tune", tmp_path)
    got = runtime_shim.apply_update(bundle, deltas["fine-tune"])
    assert got.in_place and got.bundle == str(bundle.resolve()) and tree(bundle) == tree(bundles["new_a"])
    with pytest.raises(DeltaError, match="is already the bundle this update makes") as e:
        runtime_shim.apply_update(bundle, deltas["fine-tune"])
    assert str(deltas["fine-tune"]) in str(e.value)
    assert tree(bundle) == tree(bundles["new_a"])


def test_wrong_old_is_refused_naming_both(bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path) -> None:
    bundle = old_copy(bundles, "new engine", tmp_path)  # the "old" bundle, not the fine-tune's OLD
    before = tree(bundle)
    r = CliRunner().invoke(main, ["apply", str(bundle), str(deltas["fine-tune"])])
    assert r.exit_code == 1
    want, _w, want_sha = read_bundle_manifest(bundles["old_a"])
    _m, _w, got_sha = read_bundle_manifest(bundle)
    assert want_sha in r.stderr and got_sha in r.stderr and "ERROR" in r.stderr and "Traceback" not in r.stderr
    assert tree(bundle) == before


def test_signature_travels_and_the_old_one_goes(bundles: dict[str, Path], tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(bundles["old_a"], old)
    shutil.copytree(bundles["new_a"], new)
    (old / "manifest.sig").write_bytes(b'{"old": "signature"}')
    (new / "manifest.sig").write_bytes(b'{"new": "signature"}')
    r = diff_bundles(old, new, tmp_path / "u.trtxd")
    assert r.signed
    runtime_shim.apply_update(old, tmp_path / "u.trtxd")
    assert tree(old) == tree(new)
    (new / "manifest.sig").unlink()
    shutil.rmtree(old)
    shutil.copytree(bundles["old_a"], old)
    (old / "manifest.sig").write_bytes(b'{"old": "signature"}')
    diff_bundles(old, new, tmp_path / "u2.trtxd")
    runtime_shim.apply_update(old, tmp_path / "u2.trtxd")
    assert tree(old) == tree(new), "a signature of OLD never stays beside NEW's manifest"


def test_trusted_keys_check_the_new_signature_before_writing(bundles: dict[str, Path], tmp_path: Path) -> None:
    from runtime_shim.errors import SignatureError
    from tests.test_signing import make_keys

    private, public = make_keys(tmp_path, "publisher")
    _other_private, other_public = make_keys(tmp_path, "other")
    new = tmp_path / "new"
    shutil.copytree(bundles["new_a"], new)
    cli("sign", str(new), "--key", str(private))
    diff_bundles(bundles["old_a"], new, tmp_path / "signed.trtxd")
    diff_bundles(bundles["old_a"], bundles["new_a"], tmp_path / "unsigned.trtxd")
    bundle = old_copy(bundles, "fine-tune", tmp_path)
    before = tree(bundle)
    for update, key, words in (
        ("unsigned.trtxd", public, "is not signed"),
        ("signed.trtxd", other_public, "signed by another key"),
    ):
        with pytest.raises(SignatureError, match=words):
            runtime_shim.apply_update(bundle, tmp_path / update, trusted_keys=[key])
        assert tree(bundle) == before and leftovers(tmp_path) == []
    out = json.loads(cli("apply", str(bundle), str(tmp_path / "signed.trtxd"), "--key", str(public), "--json"))
    assert out["signed"] and tree(bundle) == tree(new)


def test_without_an_atomic_exchange_files_are_moved_in(
    bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime_shim.delta_commit as commit

    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    for case in CASES:
        bundle = old_copy(bundles, case, tmp_path / case)
        runtime_shim.apply_update(bundle, deltas[case])
        assert tree(bundle) == tree(bundles[CASES[case][1]])


# --------------------------------------------------------------------------- hostile updates
def split(delta: Path) -> tuple[dict, list[tuple[str, bytes]]]:
    """(header as JSON, [(section name, stored bytes)]) of a good update file."""
    d = read_delta(delta)
    data = delta.read_bytes()
    (length,) = struct.unpack_from("<Q", data, len(data) - TRAILER.size)
    header = json.loads(data[len(data) - TRAILER.size - length : len(data) - TRAILER.size])
    return header, [(s.name, data[d.offsets[s.name] : d.offsets[s.name] + s.size]) for s in d.header.sections]


def join(path: Path, header: dict, sections: list[tuple[str, bytes]], *, keep_sizes: bool = False) -> Path:
    """An update file from parts; section sizes follow the bytes unless ``keep_sizes`` (a header that lies)."""
    if not keep_sizes:
        header["sections"] = [{"name": n, "size": len(b), "encoding": _encoding(header, n)} for n, b in sections]
    raw = json.dumps(header).encode()
    path.write_bytes(START_MAGIC + b"".join(b for _, b in sections) + raw + TRAILER.pack(len(raw), END_MAGIC))
    return path


def _encoding(header: dict, name: str) -> str:
    return next((s.get("encoding", "none") for s in header["sections"] if s["name"] == name), "none")


Edit = Callable[[dict, list], None]


def _section(name_prefix: str) -> Callable[[list], int]:
    return lambda sections: next(i for i, (n, _) in enumerate(sections) if n.startswith(name_prefix))


def _flip_in(prefix: str, at: float = 0.5) -> Edit:
    def edit(header: dict, sections: list) -> None:
        i = _section(prefix)(sections)
        name, data = sections[i]
        data = bytearray(data)
        data[int(len(data) * at)] ^= 0x40
        sections[i] = (name, bytes(data))

    return edit


def _op(field: str, value: Callable[[int], int], which: int = 0) -> Edit:
    def edit(header: dict, sections: list) -> None:
        ops = [op for op in header["weights"]["ops"] if op["from"] == "old"]
        ops[which][field] = value(ops[which][field])

    return edit


def _set(key: str, value: object) -> Edit:
    def edit(header: dict, sections: list) -> None:
        header[key] = value

    return edit


def _add_section(name: str, data: bytes = b"x" * 100) -> Edit:
    return lambda header, sections: sections.insert(1, (name, data))


def _bomb(header: dict, sections: list) -> None:
    import zstandard

    i = _section("engines/")(sections)
    sections[i] = (sections[i][0], zstandard.ZstdCompressor(level=1).compress(bytes(200 << 20)))
    for s in header["sections"]:
        s["encoding"] = "zstd" if s["name"] == sections[i][0] else s.get("encoding", "none")


def _other_new(bundles: dict[str, Path]) -> Edit:
    def edit(header: dict, sections: list) -> None:
        raw = (bundles["new_c"] / "manifest.json").read_bytes()
        sections[0] = ("manifest.json", raw)
        header["new"]["manifest_sha256"] = read_bundle_manifest(bundles["new_c"])[2]

    return edit


def _weights_twice(header: dict, sections: list) -> None:
    sections.insert(1, (header["weights"]["file"]["path"], b"x" * 10))


# case -> (update it edits, edit, error class, words the message holds)
HOSTILE: dict[str, tuple[str, Callable[[dict[str, Path]], Edit], type, str]] = {
    "literal bytes tampered": (
        "fine-tune",
        lambda b: _flip_in("weights.literals"),
        DeltaError,
        "literal bytes for NEW's",
    ),
    "carried file tampered": ("new engine", lambda b: _flip_in("caches/", 0.9), DeltaError, "it makes has sha256"),
    "recipe outside OLD's weight file": (
        "fine-tune",
        lambda b: _op("offset", lambda o: o + (1 << 40)),
        DeltaError,
        "no frame of OLD's",
    ),
    "recipe off by a byte": (
        "fine-tune",
        lambda b: _op("offset", lambda o: o + 1, which=-1),
        DeltaError,
        "no frame of OLD's",
    ),
    "recipe longer than NEW's file": (
        "fine-tune",
        lambda b: _op("size", lambda n: n + 8, which=-1),
        DeltaError,
        "weights.ops",
    ),
    "path traversal": (
        "new engine",
        lambda b: _add_section("../../evil.engine"),
        DeltaError,
        "'../../evil.engine' is not a file",
    ),
    "absolute path": ("new engine", lambda b: _add_section("/etc/passwd"), DeltaError, "'/etc/passwd' is not a file"),
    "weight file whole and as a recipe": ("fine-tune", lambda b: _weights_twice, DeltaError, "whole and as a recipe"),
    "duplicate section": ("new engine", lambda b: _add_section("manifest.json", b"{}"), DeltaError, "appears twice"),
    "zstd bomb": ("new engine", lambda b: _bomb, DeltaError, "decodes to more than"),
    "header names another NEW": (
        "fine-tune",
        lambda b: _set("new", {"manifest_sha256": "ab" * 32}),
        DeltaError,
        "its header names",
    ),
    "manifest of another NEW": ("fine-tune", _other_new, DeltaError, "which neither the update nor"),
    "header of a newer schema": (
        "fine-tune",
        lambda b: _set("schema_version", 99),
        DeltaError,
        "newer than this runtime",
    ),
    "not an update's header": ("fine-tune", lambda b: _set("kind", "trtx-bundler-part"), DeltaError, 'expected "kind"'),
    "oversized signature": (
        "fine-tune",
        lambda b: _add_section("manifest.sig", bytes((1 << 20) + 1)),
        DeltaError,
        "more than the 1048576 allowed",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_update_is_refused_and_the_bundle_kept(
    bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path, case: str
) -> None:
    which, make_edit, error, words = HOSTILE[case]
    header, sections = split(deltas[which])
    make_edit(bundles)(header, sections)
    bad = join(tmp_path / "bad.trtxd", header, sections)
    bundle = old_copy(bundles, which, tmp_path)
    before = tree(bundle)
    with pytest.raises(error) as e:
        runtime_shim.apply_update(bundle, bad)
    assert str(bad) in str(e.value) and words in str(e.value), str(e.value)
    assert tree(bundle) == before and leftovers(tmp_path) == []


def _raw_edits(good: bytes) -> dict[str, tuple[bytes, str]]:
    (length,) = struct.unpack_from("<Q", good, len(good) - TRAILER.size)
    header_at = len(good) - TRAILER.size - length
    return {
        "empty file": (b"", "too short"),
        "not an update": (b"PK\x03\x04" + bytes(100), "expected b'TRTXD"),
        "cut in the first section": (good[:100], "no end marker"),
        "cut in the header": (good[: header_at + 10], "no end marker"),
        "last byte gone": (good[:-1], "no end marker"),
        "header JSON broken": (good[:header_at] + b"}" + good[header_at + 1 :], "not valid JSON"),
        "header longer than the file": (good[:-16] + TRAILER.pack(1 << 40, END_MAGIC), "declares a header of"),
        "a byte inserted before the header": (
            good[:header_at] + b"\0" + good[header_at:],
            "lie between the start magic",
        ),
    }


def test_damaged_update_files_are_refused(bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path) -> None:
    bundle = old_copy(bundles, "fine-tune", tmp_path)
    before = tree(bundle)
    for case, (data, words) in _raw_edits(deltas["fine-tune"].read_bytes()).items():
        bad = tmp_path / "bad.trtxd"
        bad.write_bytes(data)
        with pytest.raises(DeltaError) as e:
            runtime_shim.apply_update(bundle, bad)
        assert str(bad) in str(e.value) and words in str(e.value), (case, str(e.value))
        assert tree(bundle) == before, case


def test_header_that_lies_about_section_sizes(
    bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path
) -> None:
    header, sections = split(deltas["fine-tune"])
    bundle = old_copy(bundles, "fine-tune", tmp_path)
    for size in (1 << 62, header["sections"][0]["size"] + 1):
        header["sections"][0]["size"] = size
        bad = join(tmp_path / "bad.trtxd", header, sections, keep_sizes=True)
        with pytest.raises(DeltaError, match="bytes of sections"):
            runtime_shim.apply_update(bundle, bad)


def test_hostile_update_from_the_cli_is_one_error_line(
    bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path
) -> None:
    header, sections = split(deltas["fine-tune"])
    _flip_in("weights.literals")(header, sections)
    bad = join(tmp_path / "bad.trtxd", header, sections)
    bundle = old_copy(bundles, "fine-tune", tmp_path)
    r = _cli("apply", str(bundle), str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 1 and str(bad) in errors[0] and "hint:" in r.stderr
    assert tree(bundle) == tree(bundles["old_a"])


def test_damaged_old_bundle_is_named(bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path) -> None:
    bundle = old_copy(bundles, "fine-tune", tmp_path)
    old, _w, _s = read_bundle_manifest(bundle)
    weights = bundle / old.weights.file.path
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    before = tree(bundle)
    with pytest.raises(IntegrityError, match="the bundle's weight file is damaged") as e:
        runtime_shim.apply_update(bundle, deltas["fine-tune"])
    assert str(weights) in str(e.value) and tree(bundle) == before


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", "from bundler.cli import main; main()", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- interrupted applies
_PAUSED = """
import sys, time
from pathlib import Path
import runtime_shim.delta_commit as c
def pause(a, b):
    Path(sys.argv[3]).write_text("paused")
    time.sleep(120)
c._exchange = pause
import runtime_shim
runtime_shim.apply_update(sys.argv[1], sys.argv[2])
"""


def _paused_apply(bundle: Path, delta: Path, marker: Path) -> subprocess.Popen[bytes]:
    """An in-place apply stopped with NEW whole in its temp directory, just before the exchange."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-c", _PAUSED, str(bundle), str(delta), str(marker)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "apply never reached the pause point"
        time.sleep(0.02)
    return proc


@posix_only
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_interrupted_apply_keeps_the_old_bundle(
    bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path, sig: int
) -> None:
    bundle = old_copy(bundles, "fine-tune", tmp_path)
    before = tree(bundle)
    proc = _paused_apply(bundle, deltas["fine-tune"], tmp_path / "marker")
    assert len(leftovers(tmp_path)) == 1
    proc.send_signal(sig)
    assert proc.wait(timeout=60) != 0
    assert tree(bundle) == before
    if sig == signal.SIGKILL:  # the next apply removes the dead one's temp dir (once older than the sweep's 30 s)
        (left,) = leftovers(tmp_path)
        os.utime(tmp_path / left, (time.time() - 3600, time.time() - 3600))
        r = _cli("apply", str(bundle), str(deltas["fine-tune"]))
        assert r.returncode == 0, r.stderr
        assert tree(bundle) == tree(bundles["new_a"])
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a fixed-seed mutation run
FUZZ_ROUNDS = int(os.environ.get("TRTX_FUZZ_DELTA_ROUNDS", "80"))


@pytest.mark.parametrize("case", ["fine-tune", "new engine"])
def test_mutated_updates_end_in_a_clean_error_or_the_right_bundle(
    bundles: dict[str, Path], deltas: dict[str, Path], tmp_path: Path, case: str
) -> None:
    """Bytes flipped (header and payload), runs zeroed, cuts and inserts: every outcome is a BundleError with nothing
    written, or NEW byte for byte. TRTX_FUZZ_DELTA_ROUNDS sets the number of mutations per update (80 by default)."""
    rng = random.Random(14)
    good = deltas[case].read_bytes()
    old, new = (bundles[k] for k in CASES[case])
    want = tree(new)
    (length,) = struct.unpack_from("<Q", good, len(good) - TRAILER.size)
    header_at = len(good) - TRAILER.size - length
    outcomes = {"error": 0, "intact": 0}
    for i in range(FUZZ_ROUNDS):
        data = bytearray(good)
        how = rng.choice(["flip-header", "flip-any", "zero-run", "cut", "insert"])
        if how == "flip-header":
            data[rng.randrange(header_at, len(data))] ^= 1 << rng.randrange(8)
        elif how == "flip-any":
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == "zero-run":
            at = rng.randrange(len(data))
            end = min(len(data), at + rng.randrange(1, 600))
            data[at:end] = bytes(end - at)
        elif how == "cut":
            del data[rng.randrange(len(data)) :]
        else:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randrange(1, 64))
        bad = tmp_path / f"m{i}.trtxd"
        bad.write_bytes(bytes(data))
        out = tmp_path / f"out{i}"
        try:
            runtime_shim.apply_update(old, bad, out)
        except BundleError as e:
            assert str(bad) in str(e) or str(old) in str(e), str(e)
            assert not out.exists()
            outcomes["error"] += 1
        else:
            assert tree(out) == want  # e.g. a flip inside the tool string of the header
            outcomes["intact"] += 1
            shutil.rmtree(out)
        bad.unlink()
        assert leftovers(tmp_path) == []
    assert outcomes["error"] > 0 and sum(outcomes.values()) == FUZZ_ROUNDS
    print(f"{case} update mutations: {outcomes}")


# --------------------------------------------------------------------------- full disks
def test_apply_onto_a_full_disk(
    bundles: dict[str, Path],
    deltas: dict[str, Path],
    tmpfs: Callable[..., Path],  # noqa: F811 - the fixture imported above, by name
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """-o onto a full disk; in place where OLD fits but NEW beside it does not (refused by the free-space check, then
    by the kernel's ENOSPC mid-file with that check out of the way): one error, the bundle kept, nothing left."""
    import runtime_shim.delta_commit as commit

    disk = tmpfs("full", size="1m")
    _fill(disk)
    r = _cli("apply", str(bundles["old_a"]), str(deltas["fine-tune"]), "-o", str(disk / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(disk) in r.stderr, r.stderr
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    size = sum(len(b) for b in tree(bundles["old_a"]).values())
    small = tmpfs("small", size=f"{size // 1024 + 256}k")
    bundle = small / "bundle"
    shutil.copytree(bundles["old_a"], bundle)
    before = tree(bundle)
    r = _cli("apply", str(bundle), str(deltas["fine-tune"]))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "bytes free, but the updated bundle needs" in r.stderr and "the bundle was left as it was" in r.stderr
    monkeypatch.setattr(commit, "require_free_space", lambda *a, **k: None)
    with pytest.raises(BundleError, match="cannot write the updated bundle: No space left on device") as e:
        runtime_shim.apply_update(bundle, deltas["fine-tune"])
    assert "the bundle was left as it was" in str(e.value) and "disk is full" in (e.value.hint or "")
    assert tree(bundle) == before and leftovers(small) == []
