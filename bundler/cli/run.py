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
from runtime_shim.manifest import read_bundle_manifest
from runtime_shim.select import Choice, Plan
from runtime_shim.session import load
from runtime_shim.user_cache import UserCache

from .app import emit_json, info, main, render_errors, report_lines, result

_MARK = {(True, True): "*", (True, False): "+", (False, False): "-"}
SHOWN = 20  # models doctor prints in full; --json has every one


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
@click.option(
    "--model",
    metavar="NAME",
    help="Report only this model of BUNDLE (default: every model, each with its own engines and runtime caches).",
)
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
    bundle: Path | None,
    model: str | None,
    app: str,
    cache_dir: Path | None,
    device: int | None,
    as_json: bool,
    selftest: bool,
) -> None:
    """What this machine is, and what a bundle would run on here, and why.

    \b
    Prints the probe (OS, TRT-RTX, driver, GPUs), whether TensorRT for RTX can run here, and for BUNDLE
    the ranked engines and runtime caches with the reason each was taken or passed over. BUNDLE is a
    bundle directory or a .trtx archive (its manifest is read in place; nothing is extracted).

    \b
    A bundle of several models: every model is reported, each with its own engines, runtime caches
    and verdict (--json: bundle.models[]; the text shows the first 20); --model NAME reports that one
    only (then bundle.engines and bundle.runtime_caches are its own, as for a one-model bundle).
    "TensorRT for RTX can run" means: every model reported can.

    \b
    --selftest (no BUNDLE) bundles the demo model in a temporary directory, builds a weightless engine
    for this GPU, refits it from the weight store, saves the runtime cache and loads it again, and runs
    every specialization strategy (lazy, eager, none) with CUDA graphs on and off, comparing each
    output with ONNX Runtime on the original model. It prints one JSON report (machine, versions, each
    step with its status, time and max abs difference, the verdict); where TensorRT for RTX cannot run
    it says why (verdict cannot_run, exit code 3).
    """
    if selftest:
        if model is not None:
            raise click.UsageError("--selftest runs on the built-in demo model: it takes no --model")
        _selftest(bundle, device)
        return
    if model is not None and bundle is None:
        raise click.UsageError("--model names a model of BUNDLE: give BUNDLE too")
    machine = probe()
    cache = UserCache(app, cache_dir)
    report: dict[str, Any] = {"machine": machine.to_dict(), "cache_dir": str(cache.dir)}
    from runtime_shim.select import assess, pick_gpu

    plans: list[Plan] = []
    if bundle is not None:
        plans, names, warnings = _plans(bundle, model, cache, machine, device)
        verdicts = [_verdict(p) for p in plans]
        report["bundle"] = {
            "path": str(bundle),
            "models": [
                {
                    "model": p.manifest.model.name,
                    "engines": [c.to_dict() for c in p.engines],
                    "runtime_caches": [c.to_dict() for c in p.caches],
                    "trt_rtx_can_run": ok,
                    "why_not": why,
                }
                for p, (ok, why) in zip(plans, verdicts)
            ],
            "model_names": list(names),
            "trt_rtx_version": (version := plans[0].manifest.trt_rtx.version),
            "warnings": warnings,
        }
        if len(plans) == 1:  # one model reported: its choices where a one-model bundle always had them
            report["bundle"].update(
                model=plans[0].manifest.model.name,
                engines=report["bundle"]["models"][0]["engines"],
                runtime_caches=report["bundle"]["models"][0]["runtime_caches"],
            )
        can_run = all(ok for ok, _ in verdicts)
        whys = [(p.manifest.model.name, why) for p, (ok, why) in zip(plans, verdicts) if not ok]
        same = len(whys) == len(plans) and len({w for _, w in whys}) == 1  # one reason for all (the machine's)
        why = None if can_run else whys[0][1] if same else "; ".join(f"model {name}: {w}" for name, w in whys[:SHOWN])
        if why and not same and len(whys) > SHOWN:
            why += f"; and {len(whys) - SHOWN} more models (--json lists every one)"
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
        for w in report["bundle"]["warnings"]:
            info(f"warning: {w}")
        names = report["bundle"]["model_names"]
        if len(names) > 1:
            more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            out.append(f"bundle {bundle}: {len(names)} models: {', '.join(names[:SHOWN])}{more}")
        for p, (ok, why_model) in list(zip(plans, verdicts))[:SHOWN]:
            name = p.manifest.model.name
            out.append(f"{'model' if len(names) > 1 else f'bundle {bundle}: model'} {name}, made for TRT-RTX {version}")
            out += _choice_lines("engines", p.engines) + _choice_lines("runtime caches", p.caches)
            if len(plans) > 1 and not same:
                out.append(f"model {name}: TensorRT for RTX " + ("can run it" if ok else f"cannot: {why_model}"))
        if len(plans) > SHOWN:
            out.append(f"and {len(plans) - SHOWN} more models: --model NAME shows one, --json every one")
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


def _verdict(p: Plan) -> tuple[bool, str | None]:
    """(whether TRT-RTX would run this model here, why not)."""
    taken = next(c for c in p.engines if c.taken)
    if taken.kind != "fallback":
        return True, None
    return False, p.blocker or "no engine in the bundle fits: " + "; ".join(
        c.reason
        for c in p.engines
        if c.kind in ("weightless", "weightful") or (c.kind == "build" and p.manifest.trt_rtx.cannot_parse)
    )


def _plans(
    bundle: Path, model: str | None, cache: UserCache, machine: Machine, device: int | None
) -> tuple[list[Plan], tuple[str, ...], list[str]]:
    """(select.plan_for() of ``model``, or of every model, the bundle's model names, the manifest's warnings), from a
    bundle directory or, read in place, from an archive's manifest."""
    from runtime_shim.manifest import MANIFEST_NAME
    from runtime_shim.select import plan_for

    if bundle.is_file():
        from runtime_shim.archive import read_archive_bundle

        source = f"{bundle}: {MANIFEST_NAME}"
        whole, warnings, raw = read_archive_bundle(bundle)
        sha = hashlib.sha256(raw).hexdigest()
    else:
        source = str(bundle / MANIFEST_NAME)
        whole, warnings, sha = read_bundle_manifest(bundle)
    views = [whole.view(model, source=source)] if model is not None else whole.views()
    plans = [plan_for(v, warnings, sha, cache, machine=machine, device=device) for v in views]
    return plans, whole.names, warnings


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
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
        raise InputError(
            f"--input {name}={path}: cannot read a .npy array ({e})",
            hint="save it with numpy.save(path, array); pickled objects are refused",
        ) from None


@main.command()
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model",
    metavar="NAME",
    help="The model of BUNDLE to run; needed when it holds several (the error lists their names).",
)
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
    model: str | None,
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
    (every file checked), and later runs reuse that copy. A bundle of several models runs the one
    --model names; without --model it is an error that lists the names (exit code 1).
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
        model=model,
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
