"""Farm-side commands of `trtx-bundle`: farm-job (on a GPU runner) and merge (folding its parts into the bundle)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click

from runtime_shim.errors import BundleError
from runtime_shim.machine import sm_text

from ..farm import (
    DEFAULT_ROUNDS,
    EXIT_UNSERVABLE,
    FarmSettings,
    ModelJob,
    farm_settings,
    parse_warmup_arg,
    run_farm_job,
)
from ..merge import merge_parts
from .app import emit_json, info, main, render_errors
from .app import result as say


@main.command(
    "farm-job",
    exit_codes={
        0: "the part (a part per model for a bundle of several) was written to the -o/--out directory",
        1: "error (bundle, install, build or warm-up), with a message and a hint; where some models of a bundle of "
        "several failed, the other models' parts are written and the message names the failed ones",
        EXIT_UNSERVABLE: "this machine cannot serve TensorRT for RTX: no NVIDIA GPU or driver, a GPU it does not "
        "support (e.g. SM 9.0 Hopper), or a driver too old; the message says what was found. Nothing is written, "
        "not even the -o/--out directory.",
    },
)
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--out",
    "part_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory for the part (new or empty); written all at once when the job ends. A bundle of several "
    "models gets one folder per model in it, each holding that model's part.",
)
@click.option(
    "--warmup",
    "warmups",
    multiple=True,
    metavar="NAME=SHAPE[,NAME=SHAPE]",
    help="Extra warm-up shapes (dims joined by x, e.g. x=8x64), on top of the bundle's; repeatable. In a bundle of "
    "several models, an input name applies to every model that has it; MODEL.INPUT names one model's.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help=f"Runs per warm-up shape (default {DEFAULT_ROUNDS}, or [farm].rounds of --config).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="bundle.toml whose [farm] table adds warm-up shapes and rounds.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the part manifest as JSON on stdout; for a bundle of several models, each model's outcome "
    "(model, ok, part_dir, engine_built, part, error, hint).",
)
@render_errors
def farm_job(
    bundle: Path, part_dir: Path, warmups: tuple[str, ...], rounds: int | None, config_path: Path | None, as_json: bool
) -> None:
    """Build this GPU's weightless engine and pregenerate its runtime cache, as a part for `merge`, for every model.

    \b
    BUNDLE is a bundle directory or its .trtx archive (extracted, verified, into a temporary
    directory for the job; the part then merges into the bundle it was packed from).
    Runs on a farm machine (a CI runner with the target GPU). Serves CUDA device 0; pick another
    GPU with CUDA_VISIBLE_DEVICES. The engine is built only if BUNDLE has none for this SM and
    TRT-RTX version. The warm-up runs with EAGER kernel specialization under every profile.
    A model that fails (e.g. one TensorRT for RTX could not parse) does not stop the others.
    """
    settings = FarmSettings()
    if config_path is not None:
        from ..config_file import load_config

        settings = farm_settings(load_config(config_path).farm, source=str(config_path))
    extra = [*settings.warmup, *(parse_warmup_arg(w) for w in warmups)]
    with _as_directory(bundle) as bundle_dir:
        result = run_farm_job(
            bundle_dir, part_dir, warmups=extra, rounds=rounds or settings.rounds or DEFAULT_ROUNDS, progress=info
        )
    if as_json:
        # A one-model bundle: its part manifest, as always; several models: each model's outcome.
        several = len(result.models) > 1
        emit_json(result.to_dict() if several else result.part.to_dict())
    else:
        say("\n".join(_job_line(j, len(result.models) > 1) for j in result.models))
    if result.failed:
        done = [j.model for j in result.models if j.part is not None]
        raise BundleError(
            f"the farm job failed for {len(result.failed)} of {len(result.models)} models: "
            + "; ".join(f"{j.model}: {j.error}" for j in result.failed),
            hint=f"the parts of {', '.join(done)} were written to {part_dir} and merge as usual; "
            "fix the failed models and run the job again with another -o PART_DIR",
        )


def _job_line(job: ModelJob, several: bool) -> str:
    prefix = f"model {job.model}: " if several else ""
    if job.part is None:
        return f"{prefix}FAILED: {job.error}"
    part, k = job.part, job.part.runtime_cache.key
    return (
        f"{prefix}part {job.part_dir}: {'new weightless engine' if job.engine_built else 'engine from the bundle'}, "
        f"runtime cache {part.runtime_cache.file.size} bytes for {k.gpu_name} (SM {sm_text(k.sm)}, {k.os}, driver "
        f"{k.driver_version}); {len(part.warmup)} warm-up shape set(s) in {part.timings.get('total_s', 0):.1f} s"
    )


@main.command("merge")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument(
    "part_dirs",
    metavar="PART_DIR...",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the merged bundle to this new directory instead of updating BUNDLE in place.",
)
@click.option(
    "--prefer",
    default="newest",
    show_default=True,
    metavar="newest|oldest|PART_DIR",
    help="Which cache wins when two differ for one key: the newest, the oldest, or the one from this PART_DIR "
    "(every model's part in it; PART_DIR/MODEL for one) or BUNDLE. Conflicts are always reported.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the merge report as JSON on stdout.")
@render_errors
def merge(bundle: Path, part_dirs: tuple[Path, ...], out: Path | None, prefer: str, as_json: bool) -> None:
    """Fold farm parts into BUNDLE: engines and runtime caches, after checking each part.

    \b
    A PART_DIR is what one farm-job wrote: one part, or for a bundle of several models one folder
    per model. Each part goes into the model it names; the other models are left as they were.
    Each part must be made for this bundle (sha256 of its manifest.json, or the same model, weights
    and profiles), for the same TensorRT for RTX version, and match its hashes. Nothing is changed
    unless every part passes; in place, the bundle is replaced atomically, so a crash leaves it as it was.
    """
    report = merge_parts(bundle, part_dirs, out=out, prefer=prefer, progress=info)
    if as_json:
        emit_json(report.to_dict())
        return
    lines: list[str] = []
    several = len(report.models) > 1
    for added in report.engines_added:
        e, of = added.record, _of(added.model, several)
        lines.append(
            f"+ engine {e.kind} SM {', '.join(map(sm_text, e.compute_capabilities))} {e.platform} ({e.file.sha256[:12]}){of}"
        )
    for cached in report.caches_added:
        k, size, of = cached.record.key, cached.record.file.size, _of(cached.model, several)
        lines.append(
            f"+ runtime cache {k.gpu_name} 0x{k.pci_device_id:04x} {k.os} driver {k.driver_version} ({size} bytes){of}"
        )
    for conflict in report.conflicts:
        k = conflict.key
        dropped = ", ".join(f"{src} ({sha[:12]})" for src, sha, _ in conflict.dropped)
        lines.append(
            f"! conflict: two caches for {k.gpu_name} {k.os} driver {k.driver_version}{_of(conflict.model, several)}: "
            f"kept {conflict.kept} ({conflict.kept_sha256[:12]}, {conflict.reason}); dropped {dropped}"
        )
    for note in report.notes:
        lines.append(f"note: {note}")
    lines.append(
        f"merged {len(report.parts)} part(s): {len(report.engines_added)} engine(s), {len(report.caches_added)} cache(s) added, "
        f"{len(report.conflicts)} conflict(s)"
    )
    say("\n".join(lines))


def _of(model: str, several: bool) -> str:
    return f" for model {model}" if several else ""


@contextlib.contextmanager
def _as_directory(bundle: Path) -> Iterator[Path]:
    """The bundle directory itself, or an archive extracted (every file checked) into a temp dir for the job."""
    if not bundle.is_file():
        yield bundle
        return
    from runtime_shim.archive import extract_archive

    with tempfile.TemporaryDirectory(prefix="trtx-farm-bundle-") as tmp:
        extract_archive(bundle, Path(tmp) / "bundle")
        yield Path(tmp) / "bundle"
