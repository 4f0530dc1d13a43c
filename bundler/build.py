"""`build_bundle`: ONNX model -> bundle directory (weight store, skeleton, engines, manifest), all or nothing.

Order: load and normalize the model, check the profiles, write the weight store and the skeleton, build the
engines from a normalized full model (so engine weight names are the store's names), write manifest.json
last, verify, then move the result into place. Everything is written into a temp sibling directory first,
so an error leaves the output path as it was.

Output directory rule: a missing or empty directory is filled; a non-empty one is refused unless
``force``. With ``force`` only the bundle's own files are replaced: manifest.json, the new content files, and
the old content files that the old manifest listed. Any other file there is left alone (and reported).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runtime_shim.errors import BundleError, EngineBuildError, ManifestError, ModelError
from runtime_shim.fsutil import atomic_write, disk_errors, sha256_bytes
from runtime_shim.manifest import (
    MANIFEST_NAME,
    Creator,
    FileRef,
    Manifest,
    ModelInfo,
    ParseVerdict,
    Skeleton,
    TrtRtx,
    read_manifest,
)
from runtime_shim.trt.build import ModelParseError

from . import __version__
from .bundle_io import raise_for_problems, temp_sibling, unlisted_files, verify_bundle
from .config import BuildOptions
from .dims import fit_profiles, fit_warmups
from .engines import BuiltEngine, build_engines, plan_engines, trt_rtx_identity
from .onnx_model import load_model, make_skeleton, write_normalized_model
from .store_writer import write_weight_store

__all__ = ["BuildOptions", "BuildResult", "Progress", "build_bundle", "OutputDirError"]

SKELETON_EXTERNAL_DATA = "weights.bin"


class OutputDirError(BundleError):
    """The output directory cannot be used as asked (not empty without --force, not a directory, ...)."""


class Progress(Protocol):
    """What the build reports: timed steps (the CLI shows slow ones) and one-line notes."""

    def step(self, label: str) -> AbstractContextManager[Any]: ...

    def note(self, message: str) -> None: ...

    def advance(self, label: str, done: int, total: int) -> None: ...


class _Quiet:
    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        yield

    def note(self, message: str) -> None:
        pass

    def advance(self, label: str, done: int, total: int) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    bundle_dir: Path
    manifest: Manifest
    notes: tuple[str, ...] = ()  # e.g. why no weightless engine was built
    left_alone: tuple[str, ...] = ()  # files in the output directory that are not the bundle's (with force)
    seconds: dict[str, float] = field(default_factory=dict)  # per step, engines by label

    @property
    def raw_weight_bytes(self) -> int:
        return sum(b.nbytes for b in self.manifest.weights.blobs)

    @property
    def stored_weight_bytes(self) -> int:
        return self.manifest.weights.file.size

    @property
    def engine_bytes(self) -> int:
        return sum(e.file.size for e in self.manifest.engines)


def build_bundle(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    options: BuildOptions,
    progress: Progress | None = None,
    probe: Callable[[], Any] | None = None,
) -> BuildResult:
    """Turn ``onnx_path`` into a verified bundle at ``out_dir`` (see the module docstring for the directory rule).

    ``probe`` replaces runtime_shim.machine.probe when deciding on a weightless engine (tests). A full or read-only
    disk is a BundleError naming the place; the temp directory is gone and nothing at ``out_dir`` changed.
    """
    with disk_errors(out_dir, "cannot write the bundle here", "nothing was written there"):
        return _build_bundle(onnx_path, out_dir, options=options, progress=progress, probe=probe)


def _build_bundle(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    options: BuildOptions,
    progress: Progress | None,
    probe: Callable[[], Any] | None,
) -> BuildResult:
    progress = progress or _Quiet()
    # abspath: "." or "bundle/" must still give a real name and parent for the temp sibling directory.
    src, out = Path(onnx_path), Path(os.path.abspath(out_dir))
    _check_output_dir(out, force=options.force)
    seconds: dict[str, float] = {}
    notes: list[str] = []

    def timed(label: str) -> AbstractContextManager[Any]:
        return _Timed(progress.step(label), seconds, label)

    with timed("load model"):
        model = load_model(src)

    def note(message: str) -> None:
        notes.append(message)
        progress.note(message)

    # Before any file is written or engine built: a profile TRT-RTX would refuse costs nothing here.
    profiles = fit_profiles(model, options.profiles, options.dims, source=str(src), note=note)
    warmups = fit_warmups(model.inputs, profiles, options.warmup_shapes, source=str(src), note=note)
    plans = plan_engines(options, probe=probe, note=note)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, "building")
    placed = False
    try:
        writer_kwargs = {k: v for k, v in (("level", options.level), ("threads", options.threads)) if v is not None}
        with timed("write weight store"):
            store = write_weight_store(
                model.weights,
                tmp,
                encoding=options.encoding,
                progress=lambda done, total: progress.advance("write weight store", done, total),
                **writer_kwargs,
            )
        with timed("write skeleton"):
            skeleton_bytes = make_skeleton(model, store, SKELETON_EXTERNAL_DATA)
            ref = FileRef.for_content("skeleton", sha256_bytes(skeleton_bytes), len(skeleton_bytes))
            (tmp / "skeleton").mkdir(exist_ok=True)
            atomic_write(tmp / ref.path, skeleton_bytes)
        built: list[BuiltEngine] = []
        refused: ParseVerdict | None = None  # TRT-RTX's parser refused the model while building this GPU's engine
        if plans:
            # The normalized model's file name is fixed (onnx_model.SKELETON_NAME): TRT-RTX engine bytes depend
            # on it (observed), so a random name would break byte-identical rebuilds.
            # Beside the output, not in /tmp: a big model's weights fit where its bundle fits (often not in a tmpfs).
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.normalized-", dir=out.parent) as norm_dir:
                with timed("write normalized model"):
                    model_file = write_normalized_model(
                        model, store, Path(norm_dir), SKELETON_EXTERNAL_DATA, skeleton=skeleton_bytes
                    )
                try:
                    built = build_engines(
                        Path(model_file), profiles, plans, tmp, step=progress.step, source=str(src), inputs=model.inputs
                    )
                except ModelParseError as e:
                    if options.weightful:  # asked for an engine every user needs: the error says --no-weightful
                        raise
                    # Only this GPU's weightless engine was planned: bundle for the fallback, as without a GPU.
                    refused = e.verdict
        verdict = refused if refused is not None else None if built else _parse_verdict(src, timed, note)
        if refused is not None:
            note(_refused_note(src, refused))
        for b in built:
            seconds[
                f"engine {b.engine.kind} {b.engine.platform} {list(b.engine.compute_capabilities) or 'default'}"
            ] = b.seconds
        version, flavour = trt_rtx_identity()
        manifest = Manifest(
            model=ModelInfo(
                name=options.name or src.stem,
                version=options.version,
                source_sha256=model.source_sha256,
                opset=getattr(model, "opset", None),
            ),
            inputs=tuple(model.inputs),
            outputs=tuple(model.outputs),
            profiles=profiles,
            warmup_shapes=warmups,
            trt_rtx=TrtRtx(version=version, cuda_flavour=flavour, verdict=verdict),
            weights=store,
            skeleton=Skeleton(file=ref, external_data=SKELETON_EXTERNAL_DATA),
            engines=tuple(b.engine for b in built),
            creator=Creator(tool="trtx-bundler", version=__version__, created=_source_date_epoch()),
        )
        # Round-trip through the parser: what we write must be what every reader accepts.
        manifest_json = manifest.to_json()
        Manifest.from_json(manifest_json, source=f"{out}/{MANIFEST_NAME} (as built)")
        atomic_write(tmp / MANIFEST_NAME, manifest_json)
        with timed("verify"):
            raise_for_problems(verify_bundle(tmp), what=f"{out} (as built)")
        left_alone = _move_into_place(tmp, out, manifest)
        placed = True
    finally:
        if not placed:
            shutil.rmtree(tmp, ignore_errors=True)
    if left_alone:
        progress.note(
            f"{out}: left {len(left_alone)} file(s) that are not part of the bundle: {', '.join(left_alone[:5])}"
            + (" ..." if len(left_alone) > 5 else "")
        )
    return BuildResult(
        bundle_dir=out, manifest=manifest, notes=tuple(notes), left_alone=tuple(left_alone), seconds=seconds
    )


def _parse_verdict(
    src: Path, timed: Callable[[str], AbstractContextManager[Any]], note: Callable[[str], None]
) -> ParseVerdict | None:
    """TRT-RTX's parser on the user's model when no engine was built (an engine build parses it anyway).

    None when it parses: nothing is written, so such bundles keep their bytes. A refusal is recorded in the
    manifest, so that inspect, doctor and the shim never offer to build an engine that cannot be parsed.
    """
    from runtime_shim.trt.build import check_parse

    try:
        with timed("check the model with TensorRT for RTX's parser"):
            verdict = check_parse(str(src), source=str(src))
    except EngineBuildError as e:  # the parser could not be run at all: say so, and record that it was not checked
        note(f"TensorRT for RTX's parser could not be run on {src}: {e}")
        return ParseVerdict(status="not_checked", detail=str(e).splitlines()[0][:300])
    if not verdict.failed:
        return None
    note(_refused_note(src, verdict))
    return verdict


def _refused_note(src: Path, verdict: ParseVerdict) -> str:
    return (
        f"{src}: TensorRT for RTX cannot parse this model ({verdict.summary()}): bundled for the ONNX Runtime "
        "fallback only; no machine will try to build an engine from it"
    )


class _Timed:
    """Wraps a progress step and records how long it took."""

    def __init__(self, inner: AbstractContextManager[Any], seconds: dict[str, float], label: str) -> None:
        self.inner, self.seconds, self.label = inner, seconds, label

    def __enter__(self) -> Any:
        self.t0 = time.monotonic()
        return self.inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        self.seconds[self.label] = time.monotonic() - self.t0
        return self.inner.__exit__(*exc)


def _source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH when set (reproducible-builds.org), else None: a wall-clock time would break byte-identity."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or not value.strip():
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise ModelError(
            f"SOURCE_DATE_EPOCH: expected an integer (unix seconds), got {value!r}",
            hint="unset it or set it to e.g. $(git log -1 --format=%ct)",
        ) from None


# --------------------------------------------------------------------------- output directory
def _check_output_dir(out: Path, *, force: bool) -> None:
    if out.is_symlink():
        raise OutputDirError(
            f"{out}: is a symbolic link; a bundle is written only into a real directory",
            hint="pass the link's target, or choose another output path",
        )
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a directory", hint="choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputDirError(
            f"{out}: exists and is not empty; refusing to write a bundle into it",
            hint="choose a new directory, or pass --force to replace the bundle's own files there "
            "(other files are never deleted)",
        )


def _move_into_place(tmp: Path, out: Path, new_manifest: Manifest) -> list[str]:
    """Put the finished bundle at ``out``; returns the files found there that are not the bundle's (left alone)."""
    if not out.exists():
        os.rename(tmp, out)
        return []
    # An existing directory is kept (its inode, owner and mode, and any shell sitting in it): files move in.
    old_files: set[str] = set()
    with contextlib.suppress(ManifestError, OSError):
        old_manifest, _ = read_manifest(out)
        old_files = {ref.path for _, ref in old_manifest.files()}
    new_files = {ref.path for _, ref in new_manifest.files()}
    # Content files first (a name is its content, so replacing one is harmless), then the manifest: the
    # commit point. A crash in between leaves the old manifest, still pointing at files that are there.
    for rel in sorted(new_files):
        dest = out / rel
        if dest.parent.exists() and not dest.parent.is_dir():
            raise OutputDirError(
                f"{dest.parent}: is a file where the bundle needs a folder; not touched",
                hint="move that file away, or build into a new directory",
            )
        dest.parent.mkdir(exist_ok=True)
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise OutputDirError(
                f"{dest}: exists and is not a regular file; not touched",
                hint="move it away, or build into a new directory",
            )
        os.replace(tmp / rel, dest)
    os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)
    for rel in sorted(old_files - new_files):
        with contextlib.suppress(FileNotFoundError):
            (out / rel).unlink()
    shutil.rmtree(tmp, ignore_errors=True)  # only empty folders remain in it by now
    for folder in ("engines", "caches", "weights", "skeleton"):
        with contextlib.suppress(OSError):
            (out / folder).rmdir()  # only if empty
    # tmp was verified before it moved: only files that are not the bundle's are left to report (no second hashing pass).
    return unlisted_files(out, new_manifest)
