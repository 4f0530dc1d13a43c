"""The bundle schema: round trip, key paths in errors, compatibility rules, hostile paths, corrupt files."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Annotated, Any

import pytest

from bundler.part import Part, WarmupRun
from runtime_shim import manifest as manifest_module
from runtime_shim.errors import ManifestError, ModelChoiceError, SchemaVersionError
from runtime_shim.manifest import (
    SCHEMA_VERSION,
    Blob,
    BundleManifest,
    CacheKey,
    Creator,
    Engine,
    FileRef,
    Frame,
    Manifest,
    ModelInfo,
    ParseVerdict,
    Profile,
    RuntimeCache,
    ShapeRange,
    Skeleton,
    TensorSpec,
    TrtRtx,
    UnsupportedOp,
    WeightStore,
    WeightTensor,
    read_manifest,
)
from runtime_shim.schema import Key, Record

SHA = "ab" * 32


def _manifest() -> Manifest:
    frame = Frame(offset=8, size=50, raw_size=128, digest=SHA)
    blob = Blob(sha256=SHA, nbytes=128, raw_offset=0, encoding="zstd", element_size=1, frames=(frame,))
    return Manifest(
        model=ModelInfo(name="m", version="1.0"),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("batch", 8)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("batch", 4)),),
        profiles=(Profile(shapes={"x": ShapeRange(min=(1, 8), opt=(4, 8), max=(16, 8))}),),
        warmup_shapes=({"x": (2, 8)},),
        trt_rtx=TrtRtx(version="1.7.1.116", cuda_flavour="cu13"),
        weights=WeightStore(
            file=FileRef.for_content("weights", SHA, 58),  # the magic, then the one frame
            raw_size=128,
            alignment=64,
            blobs=(blob,),
            tensors=(WeightTensor(name="W", dtype="float32", shape=(8, 4), blob=0),),
        ),
        skeleton=Skeleton(file=FileRef.for_content("skeleton", SHA, 10)),
    )


def _dict() -> dict:
    return json.loads(_manifest().to_json())


def test_round_trip_is_canonical():
    m = _manifest()
    again, warnings = Manifest.from_json(m.to_json())
    assert again == m and warnings == []
    assert again.to_json() == m.to_json()
    assert m.to_json().endswith(b"\n")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["weights"]["blobs"][0]["frames"][0].update(digest="xyz"),
            "weights.blobs[0].frames[0].digest: expected 64 lowercase hex",
        ),
        (lambda d: d["models"][0]["inputs"][0].update(dtype="complex64"), "models[0].inputs[0].dtype: expected one of"),
        (
            lambda d: d["models"][0]["profiles"][0]["shapes"]["x"].update(min=[32, 8]),
            "models[0].profiles[0].shapes.x: axis 0: expected min <= opt <= max, got 32 / 4 / 16",
        ),
        (
            lambda d: d["models"][0]["profiles"][0]["shapes"].update(z={"min": [1], "opt": [1], "max": [1]}),
            "models[0].profiles[0].shapes.z: no input of that name",
        ),
        (lambda d: d["models"][0]["tensors"][0].update(blob=3), "models[0].tensors[0].blob: index 3 out of range"),
        (
            lambda d: d["weights"]["file"].update(path="../../etc/passwd"),
            "weights.file.path: expected '<engines|caches|weights|skeleton>/<sha256>.<ext>'",
        ),
        (
            lambda d: d["models"][0]["skeleton"]["file"].update(path="skeleton/" + "cd" * 32 + ".onnx"),
            "models[0].skeleton.file.path: file name",
        ),
        (
            lambda d: d["models"][0]["skeleton"].update(external_data="../w.bin"),
            "models[0].skeleton.external_data: expected a plain file name",
        ),
        (lambda d: d.pop("trt_rtx"), "trt_rtx: missing (required)"),
        (lambda d: d["models"][0].update(name=7), "models[0].name: expected a string, got int"),
        (
            lambda d: d["models"][0].update(
                runtime_caches=[
                    {
                        "key": {
                            "os": "linux",
                            "gpu_name": "g",
                            "pci_device_id": 1,
                            "sm": 89,
                            "driver_version": "580.95",
                            "cuda_flavour": "cu13",
                            "trt_rtx_version": "1.7.1.116",
                        },
                        "engines": [SHA],
                        "file": FileRef.for_content("caches", SHA, 3).to_dict(),
                    }
                ]
            ),
            "models[0].runtime_caches[0].engines: " + SHA + " is not the sha256 of any engine",
        ),
    ],
)
def test_errors_name_the_key_path(edit, message):
    d = _dict()
    edit(d)
    with pytest.raises(ManifestError) as e:
        Manifest.from_dict(d)
    assert message in str(e.value)
    assert str(e.value).startswith("manifest.json: ")


def test_newer_major_is_refused_with_a_hint():
    d = _dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError) as e:
        Manifest.from_dict(d)
    assert f"schema_version {SCHEMA_VERSION + 1} is newer" in str(e.value)
    assert "upgrade" in e.value.hint


def test_unknown_keys_are_warnings_with_their_path():
    d = _dict()
    d["signature"] = "new in a later minor"
    d["models"][0]["engines"] = []
    d["models"][0]["license"] = "MIT"
    d["weights"]["blobs"][0]["dictionary"] = 1
    m, warnings = Manifest.from_dict(copy.deepcopy(d))
    assert m == _manifest()
    assert warnings == [
        "weights.blobs[0].dictionary: unknown key ignored (written by a newer trtx-bundler?)",
        "models[0].license: unknown key ignored (written by a newer trtx-bundler?)",
        "signature: unknown key ignored (written by a newer trtx-bundler?)",
    ]


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "not found; expected a bundle directory with manifest.json"),
        (b"", "not valid JSON"),
        (b'{"schema_version": 1, "model": ', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object at the top level"),
        (b'{"schema_version": "1"}', "schema_version: expected an integer"),
    ],
)
def test_corrupt_or_missing_manifest_file_names_the_file(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value)
    assert expected in str(e.value)


# --------------------------------------------------------------------------- every record, through the one generic codec
def _records() -> dict[type, Record]:
    """One instance of every record, optional fields set, so that each field goes through parse and to_dict."""
    m = _manifest()
    engine = Engine(
        kind="weightless",
        platform="linux_x86_64",
        compute_capabilities=(89,),
        trt_rtx_version="1.7.1.116",
        file=FileRef.for_content("engines", SHA, 5),
        built_by={"tool": "trtx-bundler 0.1.0", "host": "farm-1"},
    )
    key = CacheKey(
        os="windows",
        gpu_name="NVIDIA GeForce RTX 4090",
        pci_device_id=0x2684,
        sm=89,
        driver_version="580.95",
        cuda_flavour="cu13",
        trt_rtx_version="1.7.1.116",
        cig=True,
    )
    cache = RuntimeCache(key=key, engines=(SHA,), file=FileRef.for_content("caches", "cd" * 32, 3), created=1700000000)
    full = dataclasses.replace(
        m,
        model=ModelInfo(name="m", version="2", source_sha256=SHA, opset=17),
        engines=(engine,),
        runtime_caches=(cache,),
        creator=Creator(tool="trtx-bundler", version="0.1.0", created=1700000000),
        trt_rtx=TrtRtx(
            version="1.7.1.116",
            cuda_flavour="cu13",
            verdict=ParseVerdict(
                status="failed",
                unsupported_ops=(UnsupportedOp(op="Det", count=2, nodes=("det_a", "det_b"), detail="no kernel"),),
                detail="model-level error",
            ),
        ),
    )
    warm = WarmupRun(profile=0, shapes={"x": (2, 8)}, first_run_s=0.25, rounds=2)
    part = Part(
        bundle_manifest_sha256=SHA,
        bundle_base_sha256="cd" * 32,
        model="m",
        runtime_cache=cache,
        engine=engine,
        warmup=(warm,),
        timings={"build_s": 1.5, "total_s": 2.0},
        machine={"host": "farm-1"},
        tool_version="0.1.0",
        created=1700000000,
    )
    whole = full.whole()
    records: list[Record] = [whole, whole.models[0], whole.trt_rtx, whole.weights, full.model, full.trt_rtx]
    records += [*full.inputs, *full.profiles, full.profiles[0].shapes["x"]]
    records += [full.weights, full.weights.file, full.weights.blobs[0], full.weights.blobs[0].frames[0]]
    records += [full.weights.tensors[0], engine, key, cache, full.skeleton, full.creator, warm, part]
    records += [full.trt_rtx.verdict, full.trt_rtx.verdict.unsupported_ops[0]]  # type: ignore[union-attr]
    records += _delta_records()
    return {type(r): r for r in records}


def _delta_records() -> list[Record]:
    """The update file's header (runtime_shim/delta_format.py) uses the same codec: its records round-trip too."""
    from runtime_shim.delta_format import DeltaHeader, Op, Section, WeightsRecipe

    manifest = Section(name="manifest.json", size=100)
    section = Section(name="weights.literals", size=4, encoding="zstd")
    ops = (Op(source="old", offset=8, size=10), Op(source="delta", size=4))
    recipe = WeightsRecipe(
        file=FileRef.for_content("weights", SHA, 22), source=FileRef.for_content("weights", "cd" * 32, 18), ops=ops
    )
    header = DeltaHeader(
        old_manifest_sha256=SHA, new_manifest_sha256="cd" * 32, sections=(manifest, section), weights=recipe, tool="t"
    )
    return [section, *ops, recipe, header]


def _all_record_classes() -> set[type]:
    found, todo = set(), [Record]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith(("runtime_shim.", "bundler.")):
                found.add(sub)
            todo.append(sub)
    return found


def test_every_record_is_covered_by_the_round_trip():
    assert set(_records()) == _all_record_classes()


@pytest.mark.parametrize("cls", sorted(_records(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_record_round_trips_through_parse_and_to_dict(cls):
    record = _records()[cls]
    data = json.loads(json.dumps(record.to_dict()))  # what a file holds: lists, not tuples
    warnings: list[str] = []
    assert cls.parse(data, path="here", warnings=warnings) == record and warnings == []
    assert cls.parse(data).to_dict() == record.to_dict()


def test_keys_come_out_in_declaration_order_and_dotted_keys_nest():
    assert list(_records()[Engine].to_dict()) == [f.name for f in dataclasses.fields(Engine)]
    d = _records()[Part].to_dict()
    assert d["bundle"] == {"manifest_sha256": SHA, "base_sha256": "cd" * 32, "model": "m"}
    assert d["tool"] == {"version": "0.1.0", "tool": "trtx-bundler"} and d["kind"] == "trtx-bundler-part"


@pytest.mark.parametrize(
    "edit, message",
    [
        # wrong type, at every depth, with the key path
        (lambda d: d["weights"].update(alignment=True), "weights.alignment: expected an integer, got a boolean"),
        (lambda d: d["weights"]["file"].update(size="5"), "weights.file.size: expected an integer, got a string"),
        (lambda d: d["models"][0].update(name=None), "models[0].name: expected a string, got null"),
        (lambda d: d["models"][0]["inputs"].append([1]), "models[0].inputs[1]: expected an object, got a list"),
        (lambda d: d["models"][0].update(inputs={"x": 1}), "models[0].inputs: expected a list, got an object"),
        (
            lambda d: d["models"][0]["profiles"][0]["shapes"].update(x=[1, 8]),
            "models[0].profiles[0].shapes.x: expected an object, got a list",
        ),
        (
            lambda d: d["models"][0]["tensors"][0].update(shape="8x4"),
            "models[0].tensors[0].shape: expected a list, got a string",
        ),
        (
            lambda d: d["models"][0]["tensors"][0].update(shape=[8, -4]),
            "models[0].tensors[0].shape: expected a list of integers >= 0",
        ),
        (
            lambda d: d["models"][0].update(warmup_shapes=[[2, 8]]),
            "models[0].warmup_shapes[0]: expected an object of input name -> shape, got a list",
        ),
        (
            lambda d: d["models"][0]["warmup_shapes"][0].update(x="2x8"),
            "models[0].warmup_shapes[0].x: expected a list of integers >= 0, got '2x8'",
        ),
        (
            lambda d: d["weights"]["blobs"][0].update(element_size=3),
            "weights.blobs[0].element_size: expected 1, 2, 4 or 8, got 3",
        ),
        (
            lambda d: d["weights"]["blobs"][0].update(nbytes=64),
            "weights.blobs[0].frames: raw sizes add up to 128, expected nbytes 64",
        ),
        (lambda d: d["creator"].update(created="now"), "creator.created: expected an integer, got a string"),
        # missing, at every depth; a field with a Python default can still be required in the file
        (
            lambda d: d["weights"]["blobs"][0]["frames"][0].pop("offset"),
            "weights.blobs[0].frames[0].offset: missing (required)",
        ),
        (
            lambda d: d["models"][0]["skeleton"].pop("external_data"),
            "models[0].skeleton.external_data: missing (required)",
        ),
        (lambda d: d["creator"].pop("tool"), "creator.tool: missing (required)"),
        (lambda d: d.pop("weights"), "weights: missing (required)"),
    ],
)
def test_wrong_types_and_missing_keys_name_the_key_path(edit, message):
    d = _dict()
    edit(d)
    with pytest.raises(ManifestError) as e:
        Manifest.from_dict(d)
    assert str(e.value).startswith(f"manifest.json: {message}")


def test_optional_keys_may_be_missing_or_null():
    d = _dict()
    d.pop("creator")
    for key in ("engines", "runtime_caches", "warmup_shapes"):
        d["models"][0].pop(key)
    d["models"][0].update(version=None, opset=None)
    m, warnings = Manifest.from_dict(d)
    assert warnings == []
    assert (m.engines, m.runtime_caches, m.creator, m.warmup_shapes) == ((), (), Creator(), ())
    assert m.model == ModelInfo(name="m", version="0")


def _part_dict() -> dict[str, Any]:
    return json.loads(_records()[Part].to_json())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("bundle"), "p: bundle: missing (required)"),
        (lambda d: d.update(bundle="x"), "p: bundle: expected an object, got a string"),
        (lambda d: d["bundle"].update(manifest_sha256="x"), "p: bundle.manifest_sha256: expected 64 lowercase hex"),
        (lambda d: d["tool"].pop("tool"), "p: tool.tool: missing (required)"),
        (lambda d: d["tool"].pop("version"), "p: tool.version: missing (required)"),
        (lambda d: d.pop("created"), "p: created: missing (required)"),
        (lambda d: d["timings"].update(build_s="1"), "p: timings: expected numbers of seconds"),
        (lambda d: d["warmup"][0].update(shapes={"x": 2}), "p: warmup[0].shapes.x: expected a list of integers >= 0"),
        (
            lambda d: d["runtime_cache"].update(engines=["cd" * 32]),
            "p: runtime_cache.engines does not name the part's own engine",
        ),
    ],
)
def test_part_errors_name_the_key_path(edit, message):
    d = _part_dict()
    edit(d)
    with pytest.raises(ManifestError) as e:
        Part.from_dict(d, source="p")
    assert str(e.value).startswith(message)


def test_unknown_keys_in_nested_objects_are_warnings_never_errors():
    d = _part_dict()
    d["bundle"]["signed_by"] = "ci"
    d["tool"]["commit"] = "abc"
    d["engine"]["file"]["mtime"] = 1
    part, warnings = Part.from_dict(d, source="p")
    assert part == _records()[Part]
    assert sorted(warnings) == [
        f"{k}: unknown key ignored (written by a newer trtx-bundler?)"
        for k in ("bundle.signed_by", "engine.file.mtime", "tool.commit")
    ]


def test_a_field_the_generic_codec_cannot_read_is_refused_where_it_is_declared():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Loose(Record):
        names: tuple[str, ...]  # a list of scalars needs a check of its items

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Odd(Record):
        sizes: Mapping[str, int]

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Checked(Record):
        names: Annotated[tuple[str, ...], Key(check=lambda v: None if all(isinstance(x, str) for x in v) else "no")]

    with pytest.raises(TypeError, match="Loose.names: no codec"):
        Loose.parse({"names": []})
    with pytest.raises(TypeError, match="Odd.sizes: no codec"):
        Odd.parse({"sizes": {}})
    assert Checked.parse({"names": ["a"]}) == Checked(names=("a",))


def test_the_manifest_module_still_exports_the_moved_names():
    for name in (
        "FileRef",
        "FILE_FOLDERS",
        "Frame",
        "Blob",
        "WeightTensor",
        "WeightStore",
        "DTYPES",
        "WEIGHT_ENCODINGS",
    ):
        assert getattr(manifest_module, name) is not None and name in manifest_module.__all__


# --------------------------------------------------------------------------- schema 1, and several models (schema 2)
def _schema_1(d: dict) -> dict:
    """The schema 1 form of a one-model schema 2 manifest dict (what bundles written before schema 2 hold)."""
    (model,) = d["models"]
    v1 = {"schema_version": 1, "creator": d["creator"], "trt_rtx": dict(d["trt_rtx"])}
    v1["model"] = {k: model[k] for k in ("name", "version", "source_sha256", "opset") if k in model}
    for k in ("inputs", "outputs", "profiles", "warmup_shapes", "skeleton", "engines", "runtime_caches"):
        if k in model:
            v1[k] = model[k]
    if "parse" in model:
        v1["trt_rtx"]["parse"] = model["parse"]
    weights = {k: v for k, v in d["weights"].items() if k != "frame_digest"}
    weights["blobs"] = [
        {**b, "frames": [{("sha256" if k == "digest" else k): v for k, v in f.items()} for f in b["frames"]]}
        for b in weights["blobs"]
    ]
    weights["tensors"] = model["tensors"]
    v1["weights"] = weights
    return v1


def test_a_schema_1_manifest_reads_as_one_model_with_sha256_frame_pins():
    full = _records()[BundleManifest]
    d = json.loads(json.dumps(full.to_dict()))
    m, warnings = Manifest.from_dict(_schema_1(d))
    assert warnings == []
    assert m.weights.frame_digest == "sha256"
    assert dataclasses.replace(m.weights, frame_digest=full.weights.frame_digest) == full.views()[0].weights
    assert m.trt_rtx == full.views()[0].trt_rtx and m.engines == full.models[0].engines
    # written back, it is schema 2 and keeps the sha256 pins (upgrade re-pins them)
    again = json.loads(m.to_json())
    assert again["schema_version"] == 2 and again["weights"]["frame_digest"] == "sha256"


def test_a_schema_1_manifest_error_names_schema_2_key_paths_and_says_so():
    d = _schema_1(_dict())
    d["inputs"][0]["dtype"] = "complex64"
    with pytest.raises(ManifestError) as e:
        Manifest.from_dict(d)
    assert "models[0].inputs[0].dtype: expected one of" in str(e.value)
    assert "schema_version 1" in str(e.value)


def _two_models() -> BundleManifest:
    one = _manifest()
    other = dataclasses.replace(
        one,
        model=ModelInfo(name="head"),
        weights=one.weights.with_tensors((WeightTensor(name="W2", dtype="float32", shape=(32,), blob=0),)),
        skeleton=Skeleton(file=FileRef.for_content("skeleton", "ef" * 32, 11)),
    )
    return one.whole().with_view(other)


def test_several_models_share_one_store_and_each_is_a_view():
    bundle = _two_models()
    parsed, warnings = BundleManifest.from_json(bundle.to_json())
    assert parsed == bundle and warnings == [] and parsed.names == ("m", "head")
    head = parsed.view("head")
    assert head.model.name == "head" and [t.name for t in head.weights.tensors] == ["W2"]
    assert head.weights.blobs == parsed.view("m").weights.blobs  # one store
    # a view edited and written back keeps the other model
    edited = dataclasses.replace(head, warmup_shapes=())
    again, _ = BundleManifest.from_json(edited.to_json())
    assert again.names == ("m", "head") and again.view("m") == parsed.view("m")
    # every file once: the shared weight file is listed once
    paths = [ref.path for _, ref in parsed.files()]
    assert len(paths) == len(set(paths)) == 3


def test_a_bundle_of_several_models_needs_a_name_and_lists_them():
    raw = _two_models().to_json()
    with pytest.raises(ModelChoiceError) as e:
        Manifest.from_json(raw)
    assert "2 models (m, head)" in str(e.value) and "model=" in (e.value.hint or "")
    with pytest.raises(ModelChoiceError, match="no model named 'tail'; the bundle holds 'm', 'head'"):
        Manifest.from_json(raw, model="tail")
    assert Manifest.from_json(raw, model="head")[0].model.name == "head"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["models"][1].update(name="m"), "models[1].name: duplicate model name 'm'"),
        (lambda d: d["models"][1]["tensors"][0].update(blob=5), "models[1].tensors[0].blob: index 5 out of range"),
        (lambda d: d["models"][1]["tensors"][0].update(shape=[33]), "models[1].tensors[0]: float32 [33] is 132 bytes"),
        (lambda d: d.update(models=[]), "models: expected at least one model"),
    ],
)
def test_cross_model_rules_name_the_model(edit, message):
    d = json.loads(_two_models().to_json())
    edit(d)
    with pytest.raises(ManifestError) as e:
        BundleManifest.from_dict(d)
    assert message in str(e.value)


def test_two_models_pinning_one_file_must_pin_it_alike():
    d = json.loads(_two_models().to_json())
    d["models"][1]["skeleton"]["file"] = dict(d["models"][0]["skeleton"]["file"], size=11)
    with pytest.raises(
        ManifestError, match=r"models\[1\].skeleton.file: pins skeleton/.* as 11 bytes, but models\[0\]"
    ):
        BundleManifest.from_dict(d)
    d["models"][1]["skeleton"]["file"]["size"] = d["models"][0]["skeleton"]["file"]["size"]
    bundle, _ = BundleManifest.from_dict(d)  # an identical skeleton, pinned alike by both: listed once
    assert [k for k, _ in bundle.files()] == ["weights.file", "models[0].skeleton.file"]
