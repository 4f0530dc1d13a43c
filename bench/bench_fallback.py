"""ONNX Runtime fallback (issue 12, deliverable 4): load time and user-cache disk use, before and after, per model.

The model is a real transformer: all-MiniLM-L6-v2's trained weights (bench/_data.py) in a BERT encoder graph written
with onnx.helper (embeddings, 6 layers of attention + GELU MLP, LayerNorms; 90 MB of fp32 initializers), bundled as
`trtx-bundle build --no-weightful` would (zstd-byteplane store). Baseline, in the same run: ONNX Runtime opening that
original .onnx file. Both fallbacks open ONNX Runtime with default options on the CPU, and their outputs must equal
the original's bit for bit (checked here too).

- before: what the shim did until the in-memory fallback: on a user's first load, verify the skeleton and unpack
  skeleton + raw weights into the user cache (models/<weights sha>-<skeleton sha>/), then open that copy; on later
  loads, hash the skeleton copy, check the weights copy's size, and open it (runtime_shim.fallback at 5b71ad1^).
- after: runtime_shim.fallback.OrtSession: every load reads the skeleton and every weight frame, verified, and gives
  ONNX Runtime the initializers from memory; nothing is written.

"first" is a load into an empty user cache dir, "later" a load with the cache dir a first load left. Every file is
in the page cache (each is read once before timing); ONNX Runtime is started once before anything is timed.

    python bench/bench_fallback.py [--repeat 7] [--layers 6] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bundler.build import build_bundle
from bundler.config import BuildOptions, DimRange
from runtime_shim.fallback import OrtSession, load_in_memory, read_verified
from runtime_shim.manifest import Manifest, read_manifest
from runtime_shim.store.reader import WeightReader
from runtime_shim.user_cache import UserCache

HEADS, HIDDEN = 12, 384


def minilm_onnx(path: Path, layers: int = 6) -> Path:
    """all-MiniLM-L6-v2 as an ONNX BERT encoder (input_ids, token_type_ids, attention_mask -> last_hidden_state)."""
    weights = {}
    for w in _data.minilm_weights():
        if w.dtype == "bfloat16":  # only the bf16 copy at hand (TRTX_BENCH_DATA on the GPU machine): widen it
            bits = np.frombuffer(_data.raw_bytes(w), dtype=np.uint16).astype(np.uint32) << 16
            weights[w.name] = bits.view(np.float32).reshape(w.shape)
        else:
            weights[w.name] = np.frombuffer(_data.raw_bytes(w), dtype=w.dtype).reshape(w.shape)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, inputs: list[str], **attrs: Any) -> str:
        out = f"{op.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    for name, arr in weights.items():
        if name.startswith("pooler") or name == "embeddings.position_ids":
            continue
        linear = name.endswith(".weight") and arr.ndim == 2 and not name.startswith("embeddings")
        init(name, arr.T if linear else arr)  # torch's Linear keeps (out, in); MatMul wants (in, out)
    for name, value in {
        "heads_shape": [0, 0, HEADS, HIDDEN // HEADS],
        "hidden_shape": [0, 0, HIDDEN],
        "mask_axes": [1, 2],
        "zero_1d": [0],
    }.items():
        init(name, np.array(value, np.int64))
    init("positions", np.arange(512, dtype=np.int64))
    for name, value in {"scale": 1 / np.sqrt(HIDDEN // HEADS), "one": 1.0, "masked": -1e4, "half": 0.5}.items():
        init(name, np.array(value, np.float32))
    init("sqrt2", np.array(np.sqrt(2.0), np.float32))

    seq = node("Shape", ["input_ids"], start=1, end=2)
    pos = node("Slice", ["positions", "zero_1d", seq, "zero_1d"])
    x = node("Gather", ["embeddings.word_embeddings.weight", "input_ids"])
    x = node("Add", [x, node("Gather", ["embeddings.token_type_embeddings.weight", "token_type_ids"])])
    x = node("Add", [x, node("Gather", ["embeddings.position_embeddings.weight", pos])])
    x = node("LayerNormalization", [x, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"], epsilon=1e-12)
    mask = node("Cast", [node("Unsqueeze", ["attention_mask", "mask_axes"])], to=TensorProto.FLOAT)
    mask = node("Mul", [node("Sub", ["one", mask]), "masked"])
    for i in range(layers):
        p = f"encoder.layer.{i}."

        def linear(inp: str, name: str, p: str = p) -> str:
            return node("Add", [node("MatMul", [inp, p + name + ".weight"]), p + name + ".bias"])

        def heads(t: str, perm: list[int]) -> str:
            return node("Transpose", [node("Reshape", [t, "heads_shape"])], perm=perm)

        q = heads(linear(x, "attention.self.query"), [0, 2, 1, 3])
        k = heads(linear(x, "attention.self.key"), [0, 2, 3, 1])
        v = heads(linear(x, "attention.self.value"), [0, 2, 1, 3])
        scores = node("Add", [node("Mul", [node("MatMul", [q, k]), "scale"]), mask])
        context = node("MatMul", [node("Softmax", [scores], axis=-1), v])
        context = node("Reshape", [node("Transpose", [context], perm=[0, 2, 1, 3]), "hidden_shape"])
        x = node("Add", [linear(context, "attention.output.dense"), x])
        x = node(
            "LayerNormalization",
            [x, p + "attention.output.LayerNorm.weight", p + "attention.output.LayerNorm.bias"],
            epsilon=1e-12,
        )
        h = linear(x, "intermediate.dense")
        h = node("Mul", [node("Mul", [h, "half"]), node("Add", ["one", node("Erf", [node("Div", [h, "sqrt2"])])])])
        x = node("Add", [linear(h, "output.dense"), x])
        x = node("LayerNormalization", [x, p + "output.LayerNorm.weight", p + "output.LayerNorm.bias"], epsilon=1e-12)
    nodes[-1].output[0] = "last_hidden_state"
    graph = helper.make_graph(
        nodes,
        "minilm",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "token_type_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def feeds() -> dict[str, np.ndarray]:
    ids = np.array([[101, 7592, 1010, 2088, 999, 2023, 2003, 1037, 3231, 102]], np.int64)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}


def _options(threads: int | None) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.log_severity_level = 3  # the graph's unused-initializer notes are not news here
    if threads:
        o.intra_op_num_threads = threads
    return o


# --------------------------------------------------------------------------- before: the materialized copy
def before_load(m: Manifest, bundle: Path, cache: Path, threads: int | None) -> ort.InferenceSession:
    """The shim's fallback as it was: materialize once (verified), later trust the copy by size, open it."""
    folder = cache / "trtx-v1" / "models" / f"{m.weights.file.sha256[:32]}-{m.skeleton.file.sha256[:12]}"
    model = folder / "model.onnx"
    intact = False
    if (folder / ".complete").is_file():
        from runtime_shim.fsutil import sha256_file

        sha, _ = sha256_file(model)
        intact = (
            sha == m.skeleton.file.sha256 and (folder / m.skeleton.external_data).stat().st_size == m.weights.raw_size
        )
    if not intact:
        skeleton = read_verified(bundle, m.skeleton.file, "skeleton.file")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".m.", dir=cache))
        (tmp / "model.onnx").write_bytes(skeleton)
        with WeightReader(bundle, m.weights) as reader:
            reader.unpack_raw(tmp / m.skeleton.external_data)
        (tmp / ".complete").write_bytes(b"")
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return ort.InferenceSession(str(model), _options(threads), providers=["CPUExecutionProvider"])


def du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def interleaved(
    variants: dict[str, tuple[Callable[[], object], Callable[[], None] | None]], repeat: int
) -> dict[str, list[float]]:
    """Wall times of each variant, ``repeat`` rounds of one call each, in a rotating order: a machine shared with
    other jobs slows whatever runs while they do, and rotation spreads that over every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, setup = variants[name]
            if setup is not None:
                setup()
            gc.collect()
            t0 = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - t0)
            del result
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TRTX_BENCH_TMP")) as tmp_s:
        tmp = Path(tmp_s)
        original = minilm_onnx(tmp / "minilm.onnx", args.layers)
        bundle = tmp / "bundle"
        dims = {"batch": (DimRange(min=1, opt=1, max=8),), "seq": (DimRange(min=1, opt=64, max=512),)}
        build_bundle(original, bundle, options=BuildOptions(dims=dims, weightful=False, weightless=False))
        m, _ = read_manifest(bundle)
        for p in (original, bundle / m.weights.file.path, bundle / m.skeleton.file.path):
            p.read_bytes()  # page cache
        ort.InferenceSession(str(original), _options(args.threads), providers=["CPUExecutionProvider"])  # start ORT

        want = ort.InferenceSession(str(original), _options(args.threads), providers=["CPUExecutionProvider"]).run(
            None, feeds()
        )[0]
        after = OrtSession(m, bundle, UserCache("bench", tmp / "check"), threads=args.threads)
        before = before_load(m, bundle, tmp / "check-before", args.threads)
        assert np.array_equal(after.run(feeds())["last_hidden_state"], want), (
            "after: outputs differ from ONNX Runtime's"
        )
        assert np.array_equal(before.run(None, feeds())[0], want), "before: outputs differ from ONNX Runtime's"
        after.close()
        del before

        def fresh(name: str) -> Callable[[], None]:
            def setup() -> None:
                shutil.rmtree(tmp / name, ignore_errors=True)
                (tmp / name).mkdir()

            return setup

        def after_load(name: str) -> OrtSession:
            return OrtSession(m, bundle, UserCache("bench", tmp / name), threads=args.threads)

        for name in ("b", "a"):  # the caches the "later" variants find: what a first load left
            fresh(name)()
        before_load(m, bundle, tmp / "b", args.threads)
        after_load("a").close()
        times = interleaved(
            {
                "original": (
                    lambda: ort.InferenceSession(
                        str(original), _options(args.threads), providers=["CPUExecutionProvider"]
                    ),
                    None,
                ),
                "before first": (lambda: before_load(m, bundle, tmp / "bf", args.threads), fresh("bf")),
                "before later": (lambda: before_load(m, bundle, tmp / "b", args.threads), None),
                "after first": (lambda: after_load("af"), fresh("af")),
                "after later": (lambda: after_load("a"), None),
            },
            args.repeat,
        )
        disk_before, disk_after = du(tmp / "b"), du(tmp / "a")

        s = OrtSession(m, bundle, UserCache("bench", tmp / "a"), threads=args.threads)
        parts = s.timings
        s.close()
        cpu = time.process_time()
        load_in_memory(m, bundle)  # the CPU time of the weights part: what more cores can share
        parts["weights_cpu_s"] = time.process_time() - cpu
        print(
            f"{os.cpu_count()} CPUs, onnxruntime {ort.__version__}; model {original.stat().st_size / 1e6:.1f} MB .onnx, "
            f"{m.weights.raw_size / 1e6:.1f} MB raw weights, store {m.weights.file.size / 1e6:.1f} MB; medians of {args.repeat}"
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        print(
            f"ONNX Runtime opens the original model: median {med['original'] * 1e3:.1f} ms, "
            f"min {low['original'] * 1e3:.1f} ms (the baseline)"
        )
        print(
            f"{'':8s} {'first load':>14s} {'ratio':>6s} {'(min)':>6s} {'later load':>14s} {'ratio':>6s} {'(min)':>6s} {'user-cache bytes/model':>23s}"
        )
        for label, disk in (("before", disk_before), ("after", disk_after)):
            first, later = f"{label} first", f"{label} later"
            print(
                f"{label:8s} {med[first] * 1e3:11.1f} ms {med[first] / med['original']:5.2f}x {low[first] / low['original']:5.2f}x "
                f"{med[later] * 1e3:11.1f} ms {med[later] / med['original']:5.2f}x {low[later] / low['original']:5.2f}x {disk:23,d}"
            )
        print(
            f"after, one load's parts: weights read + verified + decoded {parts['weights_s'] * 1e3:.1f} ms "
            f"({parts['weights_cpu_s'] * 1e3:.0f} ms of CPU on the reader's threads), "
            f"ONNX Runtime session {parts['ort_session_s'] * 1e3:.1f} ms"
        )
        print("targets: first load <= 1.2x, later loads <= 1.0x; outputs equal the original's (checked)")


if __name__ == "__main__":
    main()
