"""Two models of one bundle loaded in one process (issue 13): the weights they share are read from disk once.

The bundle of bench_multi_model.py's case (b): two fine-tunes of MiniLM-L6's feed-forward layers and pooler, on real
trained weights, that differ in their last layer and pooler. Each round loads model tune_b alone (closed, nothing
held), then tune_a, then tune_b with tune_a still open, on the ONNX Runtime path (runtime_shim.load, no GPU needed).
Per load of tune_b: the bytes read from the weight file (WeightReader._read_into counted here, not in the reader) and
the load report's weights_s (read, hash, decode), medians of --repeat interleaved rounds; then, in one more round
under tracemalloc (which sees numpy's buffers, not ONNX Runtime's own memory), the memory the new session holds.
Ratios are "with the other model open" / "alone", same run.

    python bench/bench_multi_load.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_multi_model import FFN_PROFILE, ffn_onnx, minilm, spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    import onnxruntime  # noqa: F401 - imported before the first measurement: its own memory is not a session's

    import runtime_shim
    from bundler.build import build_bundle
    from bundler.config import BuildOptions
    from runtime_shim.shared_weights import REGISTRY
    from runtime_shim.store.reader import WeightReader

    read = [0]
    original = WeightReader._read_into

    def counting(self: WeightReader, offset: int, buf: memoryview) -> int:
        read[0] += len(buf)
        return original(self, offset, buf)

    WeightReader._read_into = counting  # type: ignore[method-assign]
    w = minilm()
    last = {"encoder.layer.5.up.w", "encoder.layer.5.up.b", "encoder.layer.5.down.w", "encoder.layer.5.down.b"}
    last |= {"pooler.w", "pooler.b"}
    labels = ("alone", "with tune_a open")
    timed: dict[str, list[tuple[int, float]]] = {k: [] for k in labels}  # (bytes read, weights_s) per round
    held_by_session: dict[str, int] = {}  # bytes the session of tune_b holds (tracemalloc round)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tunes = [
            spec(ffn_onnx(tmp / f"{n}.onnx", w, range(6), pooler=True, nudge=(last, seed)), n, FFN_PROFILE)
            for n, seed in (("tune_a", 1), ("tune_b", 2))
        ]
        bundle = tmp / "bundle"
        built = build_bundle(None, bundle, options=BuildOptions(weightful=False, weightless=False), models=tunes)
        store = built.bundle.weights

        def load(model: str) -> runtime_shim.Session:
            return runtime_shim.load(bundle, "bench", cache_dir=tmp / "cache", model=model)

        def load_b(label: str, traced: bool) -> runtime_shim.Session:
            gc.collect()
            read[0], before = 0, tracemalloc.get_traced_memory()[0]
            s = load("tune_b")
            if traced:
                held_by_session[label] = tracemalloc.get_traced_memory()[0] - before
            else:
                timed[label].append((read[0], s.report.timings["weights_s"]))
            return s

        for traced in [False] * args.repeat + [True]:  # the last round traces memory only: tracing slows loads
            if traced:
                tracemalloc.start()
            load_b(labels[0], traced).close()
            a = load("tune_a")
            b = load_b(labels[1], traced)
            held = REGISTRY.held(bundle / store.file.path)
            b.close()
            a.close()
        tracemalloc.stop()

    def med(label: str, i: int) -> float:
        return statistics.median(r[i] for r in timed[label])

    print(f"machine: {platform.machine()} {platform.processor() or ''}; repeat {args.repeat}")
    print(
        f"weight file {store.file.size / 1e6:.2f} MB; held while both are open: {held[0]} blobs, {held[1] / 1e6:.2f} MB"
    )
    print("| load of tune_b | read from the weight file | weights_s | memory the session holds (tracemalloc) |")
    print("|---|---|---|---|")
    for label in labels:
        print(
            f"| {label} | {med(label, 0) / 1e6:.2f} MB | {med(label, 1) * 1000:.1f} ms "
            f"| {held_by_session[label] / 1e6:.2f} MB |"
        )
    a_, b_ = labels
    print(
        f"ratios (with tune_a open / alone): read {med(b_, 0) / med(a_, 0):.3f}x, "
        f"weights_s {med(b_, 1) / med(a_, 1):.2f}x, memory held {held_by_session[b_] / held_by_session[a_]:.2f}x"
    )


if __name__ == "__main__":
    main()
