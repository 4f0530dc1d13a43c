"""`trtx-bundle run` and `trtx-bundle doctor`: the run side of the CLI (parse, call runtime_shim, render)."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path
from typing import Any

import click
import numpy as np

from runtime_shim.errors import BundleError, InputError
from runtime_shim.fsutil import atomic_write, disk_errors
from runtime_shim.machine import Machine, probe, trt_rtx_supports
from runtime_shim.select import Choice, Plan
from runtime_shim.session import load, plan
from runtime_shim.user_cache import UserCache

from .app import emit_json, info, main, render_errors, report_lines, result

_MARK = {(True, True): "*", (True, False): "+", (False, False): "-"}


def _machine_lines(m: Machine) -> list[str]:
    lines = [
        f"OS {m.os} ({m.platform}), Python {m.python}",
        f"TensorRT for RTX: {m.trt_rtx_version or 'not installed'}"
        + (f" ({m.cuda_flavour})" if m.cuda_flavour else ""),
    ]
    if m.driver_version or m.driver_cuda_version:
        lines.append(f"NVIDIA driver {m.driver_version or '?'} (supports CUDA {m.driver_cuda_text or '?'})")
    if m.problem:
        lines.append(f"GPU: none usable: {m.problem}")
    for g in m.gpus:
        ok = "supported by TRT-RTX" if trt_rtx_supports(g.sm) else "NOT supported by TRT-RTX"
        lines.append(
            f"GPU {g.index}: {g.name}, SM {g.sm_text}, device 0x{g.pci_device_id:04x}, "
            f"{g.total_memory / 2**30:.1f} GiB, {g.uuid}: {ok}"
        )
    lines += [f"note: {n}" for n in m.notes]
    return lines


def _choice_lines(title: str, choices: list[Choice]) -> list[str]:
    out = [f"{title} (* taken, + usable, - passed over):"]
    for c in choices:
        what = c.kind + (f" [{c.index}]" if c.index is not None else "")
        out.append(f"  {_MARK[(c.viable, c.taken)]} {what}: {c.reason}")
    return out


@main.command(
    exit_codes={
        0: "the report was printed (also when TensorRT for RTX cannot run here); --selftest: every step passed",
        1: "error: a message (ERROR ...) and a hint on stderr; --selftest: a step failed (the JSON report says which)",
        3: "--selftest: TensorRT for RTX cannot run on this machine (verdict cannot_run, with the reason)",
    }
)
@click.argument("bundle", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--app", default="MyApp", show_default=True, help="App name: picks the user cache dir the app would use.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Use this cache dir instead.")
@click.option("--device", type=int, help="GPU index to consider (default: the first TRT-RTX supports).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@click.option(
    "--selftest",
    is_flag=True,
    help="Run the whole GPU path on the built-in demo model and print one JSON report to attach to a bug report.",
)
@render_errors
def doctor(
    bundle: Path | None, app: str, cache_dir: Path | None, device: int | None, as_json: bool, selftest: bool
) -> None:
    """What this machine is, and what a bundle would run on here, and why.

    \b
    Prints the probe (OS, TRT-RTX, driver, GPUs), whether TensorRT for RTX can run here, and for BUNDLE
    the ranked engines and runtime caches with the reason each was taken or passed over. BUNDLE is a
    bundle directory or a .trtx archive (its manifest is read in place; nothing is extracted).

    \b
    --selftest (no BUNDLE) bundles the demo model in a temporary directory, builds a weightless engine
    for this GPU, refits it from the weight store, saves the runtime cache and loads it again, and runs
    every specialization strategy (lazy, eager, none) with CUDA graphs on and off, comparing each
    output with ONNX Runtime on the original model. It prints one JSON report (machine, versions, each
    step with its status, time and max abs difference, the verdict); where TensorRT for RTX cannot run
    it says why (verdict cannot_run, exit code 3).
    """
    if selftest:
        _selftest(bundle, device)
        return
    machine = probe()
    cache = UserCache(app, cache_dir)
    report: dict[str, Any] = {"machine": machine.to_dict(), "cache_dir": str(cache.dir)}
    from runtime_shim.select import assess, pick_gpu

    if bundle is not None:
        p = _plan(bundle, cache, machine, device)
        report["bundle"] = {
            "path": str(bundle),
            "model": p.manifest.model.name,
            "trt_rtx_version": p.manifest.trt_rtx.version,
            "engines": [c.to_dict() for c in p.engines],
            "runtime_caches": [c.to_dict() for c in p.caches],
            "warnings": p.warnings,
        }
        blocker = p.blocker
        taken = next(c for c in p.engines if c.taken)
        can_run = taken.kind != "fallback"
        why = blocker or (
            None
            if can_run
            else "no engine in the bundle fits: "
            + "; ".join(
                c.reason
                for c in p.engines
                if c.kind in ("weightless", "weightful") or (c.kind == "build" and p.manifest.trt_rtx.cannot_parse)
            )
        )
    else:
        blocker = assess(machine, pick_gpu(machine, device)).blocker
        can_run, why = blocker is None, blocker
    report["trt_rtx_can_run"], report["why_not"] = can_run, why
    from runtime_shim.gpu import nvcomp as gpu_decode

    no_gpu_decode = gpu_decode.available()
    report["weights_decoded_on_gpu"] = {
        "possible": no_gpu_decode is None,
        "why_not": no_gpu_decode,
        "nvcomp": gpu_decode.find_nvcomp(),
    }
    from runtime_shim.store.reader import native_join

    report["host_decoder_compiled"] = native_join()
    if as_json:
        emit_json(report)
        return
    out = _machine_lines(machine)
    out.append(f"user cache dir: {cache.dir}")
    out.append(
        f"refit weights: decoded on the GPU (nvCOMP at {gpu_decode.find_nvcomp()})"
        if no_gpu_decode is None
        else f"refit weights: decoded on the CPU, {no_gpu_decode} (for the GPU: {gpu_decode.NVCOMP_HINT})"
    )
    out.append(
        "CPU weight decoder: compiled helper"
        if report["host_decoder_compiled"]
        else f"CPU weight decoder: numpy fallback, 2-3x slower ({NATIVE_HINT})"
    )
    if bundle is not None:
        out.append(f"bundle {bundle}: model {p.manifest.model.name}, made for TRT-RTX {p.manifest.trt_rtx.version}")
        for w in p.warnings:
            info(f"warning: {w}")
        out += _choice_lines("engines", p.engines) + _choice_lines("runtime caches", p.caches)
    out.append(
        ("TensorRT for RTX can run here" + (" (this bundle: yes)" if bundle else ""))
        if can_run
        else f"TensorRT for RTX cannot run {'this bundle ' if bundle else ''}here: {why}"
    )
    result("\n".join(out))


def _selftest(bundle: Path | None, device: int | None) -> None:
    """doctor --selftest: the JSON report on stdout, one line on stderr, the verdict's exit code."""
    if bundle is not None:
        raise click.UsageError("--selftest runs on the built-in demo model: it takes no BUNDLE")
    from .. import selftest as st

    report = st.run_selftest(device=device)
    emit_json(report.to_dict())
    if report.verdict == "cannot_run":
        click.echo(f"selftest cannot run here: {report.reason}", err=True)
    elif report.verdict == "failed":
        click.echo(f"selftest FAILED: {report.reason}", err=True)
    else:
        info(f"selftest passed: {len(report.steps)} steps in {report.seconds:.1f} s")
    click.get_current_context().exit(report.exit_code)


def _plan(bundle: Path, cache: UserCache, machine: Machine, device: int | None) -> Plan:
    """select.plan() for a bundle directory; for an archive the same ranking from its manifest, read in place."""
    if not bundle.is_file():
        return plan(bundle, cache, machine=machine, device=device)
    from runtime_shim.archive import read_archive_manifest
    from runtime_shim.select import plan_for

    manifest, warnings, raw = read_archive_manifest(bundle)
    return plan_for(manifest, warnings, hashlib.sha256(raw).hexdigest(), cache, machine=machine, device=device)


NATIVE_HINT = (
    "the C helper runtime_shim.store._planes was not built, or TRTX_SHIM_NATIVE=0 turned it off: "
    "reinstall trtx-bundler where a C compiler is installed"
)


def _parse_input(spec: str) -> tuple[str, Path]:
    name, sep, file = spec.partition("=")
    if not sep or not name or not file:
        raise click.BadParameter(f"expected NAME=FILE.npy, got {spec!r}", param_hint="--input")
    return name, Path(file)


def _load_array(name: str, path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(
            f"--input {name}={path}: cannot read a .npy array ({e})",
            hint="save it with numpy.save(path, array); pickled objects are refused",
        ) from None


@main.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-i",
    "--input",
    "inputs",
    multiple=True,
    metavar="NAME=FILE.npy",
    required=True,
    help="An input array (repeat per input).",
)
@click.option(
    "-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), help="Save each output as NAME.npy here."
)
@click.option("--app", default="MyApp", show_default=True, help="App name: picks the user cache dir.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), help="Use this cache dir instead.")
@click.option(
    "--fallback",
    type=click.Choice(["onnxruntime", "error"]),
    default="onnxruntime",
    show_default=True,
    help="What to do where TRT-RTX cannot run this bundle.",
)
@click.option(
    "--specialization",
    type=click.Choice(["lazy", "eager", "none"]),
    default="lazy",
    show_default=True,
    help="Dynamic-shape kernel specialization (TRT-RTX).",
)
@click.option("--no-cuda-graphs", is_flag=True, help="Do not capture CUDA graphs.")
@click.option(
    "--verify-weights",
    type=click.Choice(["once", "always"]),
    default="always",
    show_default=True,
    help="Every load hashes every weight frame it reads; 'once' is still accepted and means the same "
    "(docs/WEIGHT_STORE.md, Verification). Engines and caches are hashed on every load too.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print the load report and the outputs' shapes as JSON on stdout."
)
@render_errors
def run(
    bundle: Path,
    inputs: tuple[str, ...],
    output_dir: Path | None,
    app: str,
    cache_dir: Path | None,
    fallback: str,
    specialization: str,
    no_cuda_graphs: bool,
    verify_weights: str,
    as_json: bool,
) -> None:
    """Run BUNDLE once on arrays from .npy files; save the outputs as .npy.

    BUNDLE is a bundle directory or a .trtx archive; an archive is unpacked once into the user cache
    (every file checked), and later runs reuse that copy.
    """
    feeds = {}
    for spec in inputs:
        name, path = _parse_input(spec)
        feeds[name] = _load_array(name, path)
    with load(
        bundle,
        app,
        cache_dir=cache_dir,
        specialization=specialization,
        cuda_graphs=not no_cuda_graphs,
        fallback=fallback,
        verify_weights=verify_weights,
    ) as session:
        outputs = session.run(feeds)
        report = session.report
    saved: dict[str, Any] = {}
    used: set[str] = set()
    created = output_dir is not None and not output_dir.exists()
    try:
        with disk_errors(output_dir or ".", "cannot write the outputs here", "no output was kept"):
            if output_dir is not None:
                output_dir.mkdir(parents=True, exist_ok=True)
            for name, array in outputs.items():
                entry: dict[str, Any] = {"shape": list(array.shape), "dtype": array.dtype.name}
                if output_dir is not None:
                    # tensor names may hold '/' or ':'
                    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "output"
                    while stem in used:  # two names that sanitize alike must not overwrite each other
                        stem += "_"
                    used.add(stem)
                    target = output_dir / f"{stem}.npy"
                    buf = io.BytesIO()
                    np.save(buf, array, allow_pickle=False)
                    atomic_write(target, buf.getvalue())
                    entry["file"] = str(target)
                saved[name] = entry
    except BundleError:
        if created and output_dir is not None:  # a folder this run made holds only this run's outputs
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    if as_json:
        emit_json({"report": report.to_dict(), "outputs": saved})
        return
    out = report_lines(report)
    for name, entry in saved.items():
        out.append(
            f"output {name}: {entry['dtype']} {entry['shape']}" + (f" -> {entry['file']}" if "file" in entry else "")
        )
    result("\n".join(out))
