"""The bundle schema: round trip, key paths in errors, compatibility rules, hostile paths, corrupt files."""

from __future__ import annotations

import copy
import json

import pytest

from runtime_shim.errors import ManifestError, SchemaVersionError
from runtime_shim.manifest import (
    SCHEMA_VERSION,
    Blob,
    FileRef,
    Frame,
    Manifest,
    ModelInfo,
    Profile,
    ShapeRange,
    Skeleton,
    TensorSpec,
    TrtRtx,
    WeightStore,
    WeightTensor,
    read_manifest,
)

SHA = "ab" * 32


def _manifest() -> Manifest:
    frame = Frame(offset=8, size=50, raw_size=128, sha256=SHA)
    blob = Blob(sha256=SHA, nbytes=128, raw_offset=0, encoding="zstd", element_size=4, frames=(frame,))
    return Manifest(
        model=ModelInfo(name="m", version="1.0"),
        inputs=(TensorSpec(name="x", dtype="float32", shape=("batch", 8)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=("batch", 4)),),
        profiles=(Profile(shapes={"x": ShapeRange(min=(1, 8), opt=(4, 8), max=(16, 8))}),),
        warmup_shapes=({"x": (2, 8)},),
        trt_rtx=TrtRtx(version="1.7.1.116", cuda_flavour="cu13"),
        weights=WeightStore(
            file=FileRef.for_content("weights", SHA, 100),
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
            lambda d: d["weights"]["blobs"][0]["frames"][0].update(sha256="xyz"),
            "weights.blobs[0].frames[0].sha256: expected 64 lowercase hex",
        ),
        (lambda d: d["inputs"][0].update(dtype="complex64"), "inputs[0].dtype: expected one of"),
        (
            lambda d: d["profiles"][0]["shapes"]["x"].update(min=[32, 8]),
            "profiles[0].shapes.x: axis 0: expected min <= opt <= max, got 32 / 4 / 16",
        ),
        (
            lambda d: d["profiles"][0]["shapes"].update(z={"min": [1], "opt": [1], "max": [1]}),
            "profiles[0].shapes.z: no input of that name",
        ),
        (lambda d: d["weights"]["tensors"][0].update(blob=3), "weights.tensors[0].blob: index 3 out of range"),
        (
            lambda d: d["weights"]["file"].update(path="../../etc/passwd"),
            "weights.file.path: expected '<engines|caches|weights|skeleton>/<sha256>.<ext>'",
        ),
        (
            lambda d: d["skeleton"]["file"].update(path="skeleton/" + "cd" * 32 + ".onnx"),
            "skeleton.file.path: file name",
        ),
        (
            lambda d: d["skeleton"].update(external_data="../w.bin"),
            "skeleton.external_data: expected a plain file name",
        ),
        (lambda d: d.pop("trt_rtx"), "trt_rtx: missing (required)"),
        (lambda d: d["model"].update(name=7), "model.name: expected a string, got int"),
        (
            lambda d: d.update(
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
            "runtime_caches[0].engines: " + SHA + " is not the sha256 of any engine",
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
    d["engines"] = []
    d["weights"]["blobs"][0]["dictionary"] = 1
    m, warnings = Manifest.from_dict(copy.deepcopy(d))
    assert m == _manifest()
    assert warnings == [
        "weights.blobs[0].dictionary: unknown key ignored (written by a newer trtx-bundler?)",
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
