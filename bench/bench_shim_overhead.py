"""Shim overhead before heavy work (issue 5, target 6): manifest parse + validation, machine probe, engine and cache
choice, for a bundle with 10 engines and 50 runtime caches (and silero-vad's real 341-tensor weight index).

Printed next to Python's own start-up (``python -c pass``), each the median of --repeat runs:
  in-process  the three steps, modules already imported (what a long-running app pays per load())
  cold        a fresh interpreter that imports the shim modules and does the three steps (what a CLI pays)
The probe is the real one (the driver API and NVML through ctypes, runtime_shim/nvlibs.py); on a machine without a GPU the choice is also timed
against a described RTX 4090 machine, so that every engine and cache is ranked rather than blocked up front.

    python bench/bench_shim_overhead.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _data  # noqa: E402 - bench/ is not a package: its helper imports once the path is set

SMS = (80, 86, 89, 120)
GPUS = [
    ("NVIDIA GeForce RTX 4090", 0x2684, 89),
    ("NVIDIA GeForce RTX 4080", 0x2704, 89),
    ("NVIDIA GeForce RTX 3090", 0x2204, 86),
    ("NVIDIA GeForce RTX 3060", 0x2503, 86),
    ("NVIDIA RTX A6000", 0x2230, 86),
    ("NVIDIA GeForce RTX 5090", 0x2B85, 120),
    ("NVIDIA A100-SXM4-80GB", 0x20B2, 80),
    ("NVIDIA GeForce RTX 5080", 0x2C02, 120),
    ("NVIDIA L4", 0x27B8, 89),
    ("NVIDIA GeForce RTX 4070", 0x2786, 89),
]


def _ref(folder: str, text: str, size: int) -> dict:
    from runtime_shim.fsutil import sha256_bytes
    from runtime_shim.manifest import FileRef

    return FileRef.for_content(folder, sha256_bytes(text.encode()), size).to_dict()


def make_manifest(version: str) -> bytes:
    """A manifest of 10 engines (8 weightless: 4 SMs x 2 platforms; 2 weightful) and 50 caches, as JSON bytes."""
    import _data

    from bundler.store_writer import write_weight_store
    from runtime_shim.manifest import Manifest

    with tempfile.TemporaryDirectory() as tmp:
        store = write_weight_store(_data.silero_weights(), tmp)
    engines = []
    for plat in ("linux_x86_64", "windows_amd64"):
        for sm in SMS:
            engines.append(
                {
                    "kind": "weightless",
                    "platform": plat,
                    "compute_capabilities": [sm],
                    "trt_rtx_version": version,
                    "file": _ref("engines", f"wl{plat}{sm}", 430_000),
                    "built_by": {"host": "farm"},
                }
            )
        engines.append(
            {
                "kind": "weightful",
                "platform": plat,
                "compute_capabilities": list(SMS),
                "trt_rtx_version": version,
                "file": _ref("engines", f"wf{plat}", 4_300_000),
                "built_by": {"host": "ci"},
            }
        )
    caches = []
    for i in range(50):
        name, pci, sm = GPUS[i % len(GPUS)]
        plat = ("linux_x86_64", "windows_amd64")[i // 25]
        engine = next(e for e in engines if e["platform"] == plat and e["compute_capabilities"] == [sm])
        caches.append(
            {
                "key": {
                    "os": plat.split("_")[0],
                    "gpu_name": name,
                    "pci_device_id": pci,
                    "sm": sm,
                    "driver_version": f"580.{10 + 2 * i}",
                    "cuda_flavour": "cu13",
                    "trt_rtx_version": version,
                    "cig": False,
                },
                "engines": [engine["file"]["sha256"]],
                "file": _ref("caches", f"c{i}", 2_000_000),
                "created": 1_700_000_000 + i,
            }
        )
    data = {
        "schema_version": 1,
        "model": {"name": "silero_vad", "version": "6.2.3"},
        "inputs": [
            {"name": "input", "dtype": "float32", "shape": ["batch", 576]},
            {"name": "state", "dtype": "float32", "shape": [2, "batch", 128]},
        ],
        "outputs": [{"name": "output", "dtype": "float32", "shape": ["batch", 1]}],
        "profiles": [
            {
                "shapes": {
                    "input": {"min": [1, 576], "opt": [1, 576], "max": [4, 576]},
                    "state": {"min": [2, 1, 128], "opt": [2, 1, 128], "max": [2, 4, 128]},
                }
            }
        ],
        "warmup_shapes": [{"input": [1, 576], "state": [2, 1, 128]}],
        "trt_rtx": {"version": version, "cuda_flavour": "cu13"},
        "weights": store.to_dict(),
        "skeleton": {"file": _ref("skeleton", "skel", 670_000), "external_data": "weights.bin"},
        "engines": engines,
        "runtime_caches": caches,
    }
    manifest, warnings = Manifest.from_dict(data)
    assert not warnings and len(manifest.engines) == 10 and len(manifest.runtime_caches) == 50
    return manifest.to_json()


STEPS = """
from runtime_shim.manifest import Manifest
from runtime_shim import machine as _machine, select as _select
def steps(blob, machine=None):
    m, _ = Manifest.from_json(blob)
    mach = machine or _machine.probe()
    here = _select.assess(mach, _select.pick_gpu(mach))
    return _select.rank_engines(m, here), _select.rank_caches(m, here, False), mach
"""


def median_ms(fn, repeat: int) -> float:
    return 1000 * _data.median_time(fn, repeat)


def process_ms(code: str, repeat: int) -> float:
    # As a shipped app runs: bytecode cached (PYTHONDONTWRITEBYTECODE would recompile every module every start).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def run() -> None:
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)

    run()  # writes the bytecode caches
    return median_ms(run, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    from runtime_shim import machine

    here = machine.probe()
    version = here.trt_rtx_version or "1.7.1.116"
    blob = make_manifest(version)
    scope: dict = {}
    exec(STEPS, scope)
    steps = scope["steps"]
    engines, caches, mach = steps(blob)
    print(
        f"manifest: {len(blob) / 1e3:.0f} kB JSON, 10 engines, 50 caches, 341 tensors; this machine: "
        f"{', '.join(g.name for g in mach.gpus) or 'no GPU'} ({mach.problem or 'probe ok'})"
    )
    from runtime_shim.manifest import Manifest

    parse = median_ms(lambda: Manifest.from_json(blob), args.repeat)
    probe = median_ms(machine.probe, args.repeat)
    full = median_ms(lambda: steps(blob), args.repeat)
    rtx = dataclasses.replace(
        here,
        os="linux",
        platform="linux_x86_64",
        trt_rtx_version=version,
        cuda_flavour="cu13",
        driver_version="580.95.05",
        driver_cuda_version=13000,
        problem=None,
        gpus=(
            machine.Gpu(
                index=0,
                name="NVIDIA GeForce RTX 4090",
                pci_device_id=0x2684,
                uuid="GPU-0",
                sm=89,
                total_memory=24 << 30,
                pci_bus_id="0000:01:00.0",
            ),
        ),
    )
    chosen_e, chosen_c, _ = steps(blob, rtx)
    choice = median_ms(lambda: steps(blob, rtx), args.repeat)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        f.write(blob)
    cold_code = f"{STEPS}\nsteps(open({f.name!r}, 'rb').read())"
    python = process_ms("pass", max(5, args.repeat // 2))
    cold = process_ms(cold_code, max(5, args.repeat // 2))
    Path(f.name).unlink()
    print(f"  python -c pass (start-up)                         {python:7.1f} ms")
    print(f"  in-process: parse + validate                      {parse:7.1f} ms")
    print(f"  in-process: probe                                 {probe:7.1f} ms")
    print(f"  in-process: parse + probe + choice (this machine) {full:7.1f} ms")
    print(
        f"  in-process: parse + choice (described RTX 4090)   {choice:7.1f} ms   -> engine: "
        f"{next(c.kind for c in chosen_e if c.taken)}, cache: {next(c.kind for c in chosen_c if c.taken)}"
    )
    print(
        f"  cold process: imports + parse + probe + choice    {cold:7.1f} ms  ({cold - python:.1f} ms over python's start-up)"
    )
    print(
        "  (cold = a fresh interpreter that imports the shim's manifest, machine and select modules: no numpy, no cuda-python; "
        "see python -X importtime)"
    )
    print(
        f"  target: < 50 ms for parse + probe + choice -> {'met' if max(full, choice) < 50 else 'NOT met'} in-process"
        f"; cold minus start-up {'met' if cold - python < 50 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
