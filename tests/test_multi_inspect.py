"""inspect, verify, pack and unpack of a multi-model bundle: every model shown and checked, the bytes they share
against separate bundles really built, key paths naming the model, one archive entry per shared file."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import numpy_helper

from bundler.archive import pack_bundle, unpack_bundle
from bundler.build import ModelSpec, build_bundle
from bundler.bundle_io import describe_bundle, verify_bundle
from bundler.cli import main
from bundler.config import BuildOptions
from runtime_shim.archive import check_archive, unpack_cached
from runtime_shim.errors import ModelChoiceError
from runtime_shim.manifest import MANIFEST_NAME, read_bundle_manifest
from runtime_shim.store.format import MAGIC
from tests import models

MLP = {"x": ((1, 64), (4, 64), (16, 64))}
CONV = {"input": ((1, 3, 16, 16), (2, 3, 32, 32), (4, 3, 64, 64))}


def _finetune(src: Path, out: Path) -> Path:
    """``src`` with its last layer's weight changed: shares every other tensor with it."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name == "fc2.weight":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, "fc2.weight"))
    onnx.save(model, str(out))
    return out


def _spec(name: str, src: Path) -> ModelSpec:
    return ModelSpec(source=src, name=name, profiles=models.as_profiles(CONV if name == "conv" else MLP))


def _build(out: Path, sources: dict[str, Path], **options: object) -> Path:
    specs = [_spec(n, p) for n, p in sources.items()]
    opts = {"weightful": False, "weightless": False, **options}  # no engines unless a test asks for them
    build_bundle(None, out, options=BuildOptions(**opts), models=specs)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """det and rec, two fine-tunes of one MLP; conv, unrelated; twin, det again under another name (same skeleton)."""
    root = tmp_path_factory.mktemp("src")
    det = models.make_mlp(root)
    return {"det": det, "rec": _finetune(det, root / "rec.onnx"), "conv": models.make_conv(root), "twin": det}


@pytest.fixture(scope="module")
def bundle(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("multi") / "bundle", sources)


@pytest.fixture
def copy(bundle: Path, tmp_path: Path) -> Path:
    shutil.copytree(bundle, tmp_path / "copy")
    return tmp_path / "copy"


def _edit(bundle: Path, change: Callable[[dict], object]) -> None:
    doc = json.loads((bundle / MANIFEST_NAME).read_bytes())
    change(doc)
    (bundle / MANIFEST_NAME).write_text(json.dumps(doc))


def _cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


# --------------------------------------------------------------------------- inspect
def test_inspect_shows_each_model_and_the_bytes_they_share(
    bundle: Path, sources: dict[str, Path], tmp_path: Path
) -> None:
    d = describe_bundle(bundle)
    assert [m["model"]["name"] for m in d["models"]] == ["det", "rec", "conv", "twin"]
    assert "model" not in d and "inputs" not in d  # several models: nothing of one model at the top level
    det, rec, conv, twin = d["models"]
    assert [t["name"] for t in det["inputs"]] == ["x"] and [t["name"] for t in conv["inputs"]] == ["input"]
    assert len(det["profiles"]) == 1 and det["coverage"]["rows"] and det["engines"] == []
    assert (det["weights"]["tensors"], det["weights"]["shared_blobs"]) == (4, 4)  # twin uses all four
    assert (rec["weights"]["shared_blobs"], conv["weights"]["shared_blobs"]) == (3, 0)
    assert d["weights"]["tensors"] == 4 + 4 + 6 + 4 and d["weights"]["blobs"] == 4 + 1 + 6
    s = d["shared"]
    assert s["models"] == 4 and s["blobs"] == 4 and s["bundle_stored_bytes"] == d["weights"]["stored_bytes"]
    groups = {tuple(g["models"]): g["blobs"] for g in s["by_models"]}
    assert groups == {("det", "rec", "twin"): 3, ("det", "twin"): 1}
    assert s["files"] == [{"path": det["skeleton"]["file"]["path"], "models": ["det", "twin"]}]
    # What separate bundles would store, against separate bundles really built with the same settings.
    separate = 0
    for name, src in sources.items():
        one = _build(tmp_path / name, {name: src})
        separate += read_bundle_manifest(one)[0].weights.file.size
        alone = describe_bundle(one)
        assert (
            alone["weights"]["stored_bytes"] - len(MAGIC)
            == d["models"][list(sources).index(name)]["weights"]["stored_bytes"]
        )
    assert s["separate_stored_bytes"] == separate
    assert s["saved_stored_bytes"] == separate - d["weights"]["stored_bytes"] > 0


def test_a_one_model_bundle_keeps_its_keys_and_adds_models_and_shared(sources: dict[str, Path], tmp_path: Path) -> None:
    d = describe_bundle(_build(tmp_path / "one", {"det": sources["det"]}))
    assert list(d) == [
        *("bundle", "schema_version", "model", "trt_rtx", "inputs", "outputs", "profiles", "warmup_shapes"),
        *("weights", "skeleton", "engines", "runtime_caches", "coverage", "creator", "warnings", "models", "shared"),
    ]
    (m,) = d["models"]
    assert {k: v for k, v in m.items() if k != "weights"} == {k: d[k] for k in m if k != "weights"}
    assert (
        m["weights"]["stored_bytes"] + len(MAGIC) == d["weights"]["stored_bytes"]
    )  # the frames, without the file's magic
    s = d["shared"]
    assert (s["blobs"], s["saved_stored_bytes"], s["by_models"], s["files"]) == (0, 0, [], [])


def test_inspect_model_narrows_and_names_the_choices(bundle: Path) -> None:
    d = describe_bundle(bundle, model="rec")
    assert d["model"]["name"] == "rec" and [m["model"]["name"] for m in d["models"]] == ["rec"]
    assert d["shared"]["models"] == 4  # what it shares is still the bundle's
    with pytest.raises(ModelChoiceError, match="'det', 'rec', 'conv', 'twin'"):
        describe_bundle(bundle, model="nope")
    text = _cli("inspect", bundle, "--model", "rec")
    assert text.exit_code == 0 and "model    rec 0" in text.output and "det 0" not in text.output
    assert "3 of the blobs other models use too" in text.output and "separate bundles" in text.output
    bad = _cli("inspect", bundle, "--model", "nope")
    assert bad.exit_code == 1 and "no model named 'nope'" in bad.output


def test_inspect_text_and_json_of_several_models(bundle: Path, tmp_path: Path) -> None:
    text = _cli("inspect", bundle)
    assert text.exit_code == 0
    for part in ("models   4: det, rec, conv, twin", "== model det ==", "== model conv ==", "det, rec, twin: 3 blobs"):
        assert part in text.output, part
    assert "pinned by det, twin" in text.output
    as_dir = json.loads(_cli("inspect", bundle, "--json").output)
    archive = pack_bundle(bundle, tmp_path / "m.trtx").path
    as_tar = json.loads(_cli("inspect", archive, "--json").output)
    assert {**as_dir, "bundle": ""} == {**as_tar, "bundle": ""}  # an archive's manifest, read in place


# --------------------------------------------------------------------------- verify
def test_verify_checks_every_model(bundle: Path, copy: Path) -> None:
    assert verify_bundle(bundle) == []
    conv = read_bundle_manifest(copy)[0].models[2]
    (copy / conv.skeleton.file.path).unlink()
    (p,) = verify_bundle(copy)
    assert p.kind == "missing" and "models[2].skeleton.file" in p.message


def test_a_model_without_its_tensors_is_named(copy: Path) -> None:
    """rec's skeleton refers to four tensors, its manifest entry lists none: the check names models[1]."""
    _edit(copy, lambda d: d["models"][1].update(tensors=[]))
    (p,) = verify_bundle(copy)
    assert p.kind == "index" and p.message.startswith("models[1] ('rec'): ") and "fc1.weight" in p.message


def test_a_tensor_on_a_blob_of_another_size_is_refused_at_parse(copy: Path) -> None:
    def point_at_wrong_blob(d: dict) -> None:
        sizes = [b["nbytes"] for b in d["weights"]["blobs"]]
        t = d["models"][2]["tensors"][0]
        t["blob"] = next(i for i, n in enumerate(sizes) if n != sizes[t["blob"]])

    _edit(copy, point_at_wrong_blob)
    (p,) = verify_bundle(copy)
    assert p.kind == "schema" and "models[2].tensors[0]" in p.message


def test_a_shared_file_is_pinned_once(bundle: Path) -> None:
    """det and twin pin one skeleton: files() (what verify, pack and unpack walk) lists it once, by its first key."""
    shared = [f["path"] for f in describe_bundle(bundle)["shared"]["files"]]
    keys = [k for k, ref in read_bundle_manifest(bundle)[0].files() if ref.path in shared]
    assert keys == ["models[0].skeleton.file"]


# --------------------------------------------------------------------------- pack / unpack
def test_pack_unpack_carry_every_model_once(bundle: Path, tmp_path: Path) -> None:
    packed = pack_bundle(bundle, tmp_path / "m.trtx")
    with tarfile.open(packed.path) as tar:
        names = tar.getnames()
    pinned = sorted({ref.path for _, ref in read_bundle_manifest(bundle)[0].files()})
    assert names == [MANIFEST_NAME, *pinned] and len(pinned) == 1 + 3  # the weight file, three skeletons
    assert check_archive(packed.path).names == ("det", "rec", "conv", "twin")
    back = unpack_bundle(packed.path, tmp_path / "out")
    assert back == read_bundle_manifest(bundle)[0] and verify_bundle(tmp_path / "out") == []
    r = _cli("unpack", packed.path, "-o", tmp_path / "out2")
    assert r.exit_code == 0 and "det 0, rec 0, conv 0, twin 0, 4 files verified" in r.output


def test_one_cached_copy_serves_every_model(bundle: Path, tmp_path: Path) -> None:
    archive = pack_bundle(bundle, tmp_path / "m.trtx").path
    first, again = unpack_cached(archive, tmp_path / "c"), unpack_cached(archive, tmp_path / "c")
    assert first == again and [p.name for p in (tmp_path / "c").iterdir()] == [first.name]
    assert first.name.startswith("det+3-") and verify_bundle(first) == []


def test_engines_of_each_model_are_shown_verified_and_packed(sources: dict[str, Path], tmp_path: Path) -> None:
    """A real TRT-RTX AOT build (no GPU needed): each model gets its own weightful engine, and every engine is
    shown under its model, verified and carried by the archive."""
    pair = {"det": sources["det"], "rec": sources["rec"]}
    b = _build(tmp_path / "b", pair, weightful=True, sms=(86,))
    d = describe_bundle(b)
    engines = {m["model"]["name"]: [e["file"]["path"] for e in m["engines"]] for m in d["models"]}
    assert all(len(paths) == 1 for paths in engines.values()) and engines["det"] != engines["rec"]
    for m in d["models"]:
        assert {r["engine"] for r in m["coverage"]["rows"] if r["sm"] == 86} == {"weightful"}
    assert verify_bundle(b) == []
    with tarfile.open(pack_bundle(b, tmp_path / "b.trtx").path) as tar:
        assert {p for paths in engines.values() for p in paths} <= set(tar.getnames())
    (engine_of_rec,) = engines["rec"]
    (b / engine_of_rec).write_bytes(b"")
    (p,) = verify_bundle(b)
    assert p.kind == "truncated" and "models[1].engines[0].file.size" in p.message


# --------------------------------------------------------------------------- hostile manifests (directories)
@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["models"][3].update(name="det"), "models[3].name: duplicate model name 'det'"),
        (lambda d: d["models"][1].update(name="n" * 100_000), "models[1].name: expected at most 256 characters"),
        (lambda d: d["models"][3]["skeleton"]["file"].update(size=1), "models[3].skeleton.file: pins skeleton/"),
    ],
    ids=["same-name", "name-100k", "one-path-two-sizes"],
)
def test_hostile_model_entries_are_one_short_schema_problem(
    copy: Path, edit: Callable[[dict], object], expected: str
) -> None:
    _edit(copy, edit)
    (p,) = verify_bundle(copy)
    assert p.kind == "schema" and expected in p.message and len(p.message) < 1000
    for command in (("verify", copy), ("inspect", copy), ("inspect", copy, "--json")):
        r = _cli(*command)
        assert r.exit_code == 1 and expected in r.output and len(r.output) < 2000, command


def test_thousands_of_models_without_their_tensors(copy: Path) -> None:
    """2000 models, each a copy of det without its tensors: one problem per model, each naming it; the skeleton
    they share is read once (same file, same tensors); the CLI lists 20 and says how many more."""
    _edit(copy, lambda d: d.update(models=[dict(d["models"][0], name=f"m{i}", tensors=[]) for i in range(2000)]))
    problems = verify_bundle(copy)
    assert len(problems) == 2000 + 2  # and the two skeletons (rec's, conv's) no model pins any more
    assert problems[1999].message.startswith("models[1999] ('m1999'): ")
    r = _cli("verify", copy)
    assert r.exit_code == 1 and "... and 1982 more (--json lists them all)" in r.output and len(r.output) < 20_000
    assert len(json.loads(_cli("verify", copy, "--json").output)["problems"]) == 2002
