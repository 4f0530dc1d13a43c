"""Build-side commands of `trtx-bundle`: build, inspect, verify, pack, unpack, demo (parse, call the library, render)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from runtime_shim.errors import BundleError
from runtime_shim.manifest import WEIGHT_ENCODINGS
from runtime_shim.targets import sm_text

from .app import EXIT_ERROR, StderrProgress, emit_json, info, main, mib, render_errors, report_lines, result


def _parse_sms(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v.strip().replace(".", "")) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected compute capabilities like 80,86,89,120, got {value!r}") from None


@main.command()
@click.argument("models", nargs=-1, type=click.Path(dir_okay=False, path_type=Path), metavar="[MODEL.onnx]...")
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Bundle directory to create.",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="[MODEL.]NAME=MIN:OPT:MAX",
    help="Range of a dynamic input, dims joined by x (1x3x224x224:4x3x224x224:16x3x224x224; one shape = fixed). "
    "The k-th --shape of an input goes to profile k; an input given once applies to every profile. "
    "Several models: MODEL.INPUT, where MODEL. may be left out if one model alone has that input. "
    "With --dim: replaces that model's profiles, dims and warm-ups of --config.",
)
@click.option(
    "--dim",
    "dims",
    multiple=True,
    metavar="[MODEL.]NAME=MIN:OPT:MAX",
    help="Range of a named dynamic dim, shared by every input that uses it (--dim seq_len=1:128:512; one number = "
    "fixed). The k-th --dim of a name goes to profile k. Several models: MODEL.DIM, as for --shape. With --shape: "
    "replaces that model's profiles, dims and warm-ups of --config.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="bundle.toml (see templates/bundle.toml); its [[model]] tables may list the models instead of MODEL.onnx.",
)
@click.option(
    "--sm",
    callback=_parse_sms,
    metavar="80,86,...",
    help="Targets of the weightful engine (default: TRT-RTX's default targets).",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    help="Model name in the manifest (default: the ONNX file's stem). Several models: once per file, in order.",
)
@click.option(
    "--model-version",
    "versions",
    multiple=True,
    help="Model version in the manifest (default: 0). Several models: once (all of them) or once per file.",
)
@click.option(
    "--no-weightful", is_flag=True, help="Skip the weightful multi-SM engine (the farm builds weightless ones)."
)
@click.option("--encoding", type=click.Choice(WEIGHT_ENCODINGS), help="Weight store encoding (default zstd-byteplane).")
@click.option(
    "--force",
    is_flag=True,
    help="Write into a non-empty directory: replaces the bundle's own files only, never deletes others.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@render_errors
def build(
    models: tuple[Path, ...],
    output: Path,
    shapes: tuple[str, ...],
    dims: tuple[str, ...],
    config_path: Path | None,
    sm: tuple[int, ...] | None,
    names: tuple[str, ...],
    versions: tuple[str, ...],
    no_weightful: bool,
    encoding: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Turn MODEL.onnx into a bundle: weight store, skeleton, engines, manifest.

    Several files make one bundle of several models (trtx-bundle build det.onnx cls.onnx rec.onnx -o ocr/),
    each named after its file's stem, with one weight store: a tensor that models share is stored once.
    """
    from ..build import build_bundle
    from ..config import make_options
    from ..config_file import load_config
    from ..model_options import plan_models
    from ..store_sharing import store_sharing

    config = load_config(config_path) if config_path else None
    plan = plan_models(config, models, names=names, versions=versions, shapes=shapes, dims=dims)
    for message in plan.notes:
        info(f"note: {message}")
    options = make_options(config, sms=sm, weightful=False if no_weightful else None, encoding=encoding, force=force)
    t0 = time.monotonic()
    built = build_bundle(
        None, output, options=options, models=plan.specs, fit_specs=plan.fit, progress=StderrProgress()
    )
    views = built.bundle.views()
    sharing = store_sharing(built.bundle)
    summary = {
        "bundle": str(built.bundle_dir),
        "model": views[0].model.name if len(views) == 1 else None,
        "seconds": round(time.monotonic() - t0, 3),
        "raw_weight_bytes": built.raw_weight_bytes,
        "stored_weight_bytes": built.stored_weight_bytes,
        "engines": [dict(_engine_dict(e), model=v.model.name) for v in views for e in v.engines],
        "notes": [*plan.notes, *built.notes],
        "left_alone": list(built.left_alone),
        "step_seconds": {k: round(v, 3) for k, v in built.seconds.items()},
        "models": [_model_dict(v, sharing) for v in views],
        "weights": sharing.to_dict(),
    }
    if as_json:
        emit_json(summary)
        return
    out = [f"built {built.bundle_dir} in {summary['seconds']:.1f} s", "  weights: " + weights_words(built)]
    if len(views) > 1:
        out.append("  shared: " + _sharing_words(sharing))
    for v in views:
        indent = "  "
        if len(views) > 1:
            ins = ", ".join(f"{t.name} {_dims(list(t.shape))}" for t in v.inputs)
            out.append(
                f"  model {v.model.name} (version {v.model.version}): inputs {ins}; {len(v.profiles)} profile(s)"
            )
            indent = "    "
        out += [indent + line for line in _engine_lines(v)]
    result("\n".join(out))


def _engine_dict(e: Any) -> dict[str, Any]:
    return {
        "kind": e.kind,
        "platform": e.platform,
        "compute_capabilities": list(e.compute_capabilities),
        "size": e.file.size,
        "path": e.file.path,
    }


def _model_dict(v: Any, sharing: Any) -> dict[str, Any]:
    """One model of the build summary: what build made of it."""
    weights = next(w for w in sharing.models if w.name == v.model.name)
    return {
        "name": v.model.name,
        "version": v.model.version,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in v.inputs],
        "profiles": len(v.profiles),
        "warmup_shapes": len(v.warmup_shapes),
        "engines": [_engine_dict(e) for e in v.engines],
        "parse": v.trt_rtx.verdict.to_dict() if v.trt_rtx.verdict is not None else None,
        "tensors": weights.tensors,
        "blobs": weights.blobs,
        "raw_weight_bytes": weights.raw_bytes,
        "stored_weight_bytes": weights.stored_bytes,
    }


def _engine_lines(v: Any) -> list[str]:
    out = []
    for e in v.engines:
        targets = ", ".join(map(sm_text, e.compute_capabilities)) or "TRT-RTX default targets"
        out.append(f"engine: {e.kind} {e.platform} SM {targets}: {mib(e.file.size)}")
    if not v.engines:
        refused = v.trt_rtx.cannot_parse
        out.append(
            f"engines: none (TensorRT for RTX cannot parse the model: {refused.summary()}; the ONNX Runtime "
            "fallback runs it)"
            if refused is not None
            else "engines: none (a farm or the user's GPU builds them; the ONNX Runtime fallback runs it meanwhile)"
        )
    return out


def _sharing_words(s: Any) -> str:
    """'3 blobs used by more than one model (1.2 MiB raw); saved 2.4 MiB raw, 2.0 MiB stored'."""
    if not s.shared_blobs:
        return "no tensor is in more than one model"
    return (
        f"{s.shared_blobs} blob(s) used by more than one model ({mib(s.shared_raw_bytes)} raw); separate bundles "
        f"would store {mib(s.saved_raw_bytes)} raw, {mib(s.saved_stored_bytes)} stored more"
    )


def weights_words(r: Any) -> str:
    """'12.0 MiB raw -> 9.1 MiB stored (1.32x)', or 'none (the model has no weights)'."""
    if not r.raw_weight_bytes:
        return "none (the model has no weights)"
    ratio = f" ({r.raw_weight_bytes / r.stored_weight_bytes:.2f}x)" if r.stored_weight_bytes else ""
    return f"{mib(r.raw_weight_bytes)} raw -> {mib(r.stored_weight_bytes)} stored{ratio}"


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--model", "model", metavar="NAME", help="Show only this model of the bundle (and what it shares).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@render_errors
def inspect(bundle: Path, model: str | None, as_json: bool) -> None:
    """Show what a bundle holds: each model's I/O, profiles, weights, engines, runtime caches and coverage, and the
    weight bytes its models share.

    BUNDLE is a bundle directory or a .trtx archive (its manifest is read in place; nothing is extracted).
    """
    from ..bundle_io import describe_bundle
    from .inspect_text import render

    d = describe_bundle(bundle, model=model)
    if as_json:
        emit_json(d)
    else:
        result(render(d))


def _dims(shape: list) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


@main.command(exit_codes={1: "the bundle has problems (listed on stdout), or it cannot be read"})
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON on stdout.")
@click.option(
    "--key",
    "keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trusted PEM public key: manifest.sig must be a signature by it (repeat: by one of them).",
)
@click.option("--identity", help="Keyless: the signer's identity (e.g. the CI workflow's URL); with --issuer.")
@click.option(
    "--issuer", help="Keyless: the OIDC issuer of --identity (e.g. https://token.actions.githubusercontent.com)."
)
def verify(bundle: Path, as_json: bool, keys: tuple[Path, ...], identity: str | None, issuer: str | None) -> None:
    """Check the schema and every file's size and sha256; name what is missing, changed, truncated or extra.

    BUNDLE is a bundle directory or a .trtx archive. An archive is checked in place: every entry is read
    through the unpack rules and hashed, and nothing is written (engine headers are not checked there).
    The signature (manifest.sig) is checked with --key, or --identity and --issuer; without them verify
    only says whether the bundle is signed.
    """
    if (identity is None) != (issuer is None) or (keys and identity):
        raise click.UsageError("keyless verification takes --identity and --issuer together, and no --key")
    from ..bundle_io import Problem, verify_bundle
    from ..engines import local_header_check

    if bundle.is_file():
        from runtime_shim.archive import check_archive

        try:
            check_archive(bundle)
            problems: list[Problem] = []
        except BundleError as e:
            problems = [Problem(kind="archive", path=str(bundle), message=str(e), hint=e.hint)]
    else:
        header_check, why_not = local_header_check()
        if why_not and not as_json:
            info(why_not)
        problems = verify_bundle(bundle, header_check=header_check)
    from ..sign import signature_check

    signature, signature_problems = signature_check(bundle, keys=keys, identity=identity, issuer=issuer)
    problems += signature_problems
    fatal = [p for p in problems if p.fatal]
    if as_json:
        emit_json(
            {
                "bundle": str(bundle),
                "ok": not fatal,
                "problems": [p.to_dict() for p in problems],
                "signature": signature.to_dict() if signature else None,
            }
        )
    else:
        for p in problems:
            if not p.fatal:
                info(f"warning: {p}")
        if fatal:
            click.secho(f"ERROR {bundle}: {len(fatal)} problem(s), listed on stdout", fg="red", err=True)
            out = [f"FAILED {bundle}: {len(fatal)} problem(s)"] + [f"  {p}" for p in fatal[:20]]
            if len(fatal) > 20:
                out.append(f"  ... and {len(fatal) - 20} more (--json lists them all)")
            hint = next((p.hint for p in fatal if p.hint), None)
            if hint:
                out.append(f"hint: {hint}")
            result("\n".join(out))
        else:
            what = (
                "every entry of the archive matches its manifest"
                if bundle.is_file()
                else "every file matches the manifest"
            )
            result(f"OK {bundle}: {what}" + (f"\nsignature: {signature.words()}" if signature else ""))
    if fatal:
        sys.exit(EXIT_ERROR)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Archive file to write.",
)
@render_errors
def pack(bundle: Path, output: Path) -> None:
    """Pack a verified bundle into one file (a deterministic, uncompressed tar)."""
    from ..archive import pack_bundle

    r = pack_bundle(bundle, output)
    result(f"packed {r.files} files into {r.path} ({mib(r.size)})")
    if r.left_out:
        info(f"warning: left out {len(r.left_out)} file(s) the manifest does not list: {', '.join(r.left_out[:5])}")


@main.command()
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="New (or empty) directory.",
)
@render_errors
def unpack(archive: Path, output: Path) -> None:
    """Unpack a bundle archive safely (no links, devices, absolute paths or '..') and verify it."""
    from ..archive import unpack_bundle

    b = unpack_bundle(archive, output)
    shown = ", ".join(f"{m.name} {m.version}" for m in b.models[:5]) + (
        f" and {len(b.models) - 5} more models" if len(b.models) > 5 else ""
    )
    result(f"unpacked {archive} into {output}: {shown}, {len(b.files())} files verified")


@main.command()
@click.option(
    "-o",
    "--output",
    "workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("trtx-demo"),
    show_default=True,
    help="Where to put the demo model, its bundle and the user cache.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the shim's report as JSON on stdout.")
@render_errors
def demo(workdir: Path, as_json: bool) -> None:
    """Bundle a small built-in model, load it with the runtime shim, and check its outputs.

    \b
    Needs no download: the model is generated here. The bundle lands in OUTPUT/bundle; the
    shim then picks an engine for this machine (TensorRT for RTX on an RTX GPU, else the
    ONNX Runtime fallback, with the reason) and the logits are compared with ONNX Runtime
    on the original model.
    """
    from ..demo import run_demo

    done = run_demo(workdir, progress=StderrProgress(), cache_dir=workdir / "user-cache", note=info)
    out = report_lines(done.report)
    if done.max_abs_error is not None:
        out.append(f"max |difference| vs ONNX Runtime on the original model: {done.max_abs_error:.3g}")
    if as_json:
        emit_json(done.report.to_dict())
        if done.max_abs_error is not None:
            info(out[-1])  # stdout holds the JSON alone
    else:
        result("\n".join(out))
    if done.max_abs_error is not None and done.max_abs_error > 1e-4:
        raise BundleError(
            f"demo outputs differ from the original model by {done.max_abs_error:.3g}",
            hint="please report this with the output of 'trtx-bundle doctor'",
        )
    info(f"demo OK: try 'trtx-bundle inspect {done.bundle_dir}' and 'trtx-bundle doctor {done.bundle_dir}'")
