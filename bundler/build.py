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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from runtime_shim.errors import EngineBuildError, ModelError
from runtime_shim.fsutil import atomic_write, disk_errors, sha256_bytes
from runtime_shim.manifest import (
    MANIFEST_NAME,
    BundleManifest,
    Creator,
    FileRef,
    Manifest,
    Model,
    ParseVerdict,
    Profile,
    Shape,
    Skeleton,
    TensorSpec,
    TrtRtxTarget,
    WeightStore,
)
from runtime_shim.signing import SIGNATURE_NAME
from runtime_shim.trt.build import ModelParseError

from . import __version__
from .bundle_io import raise_for_problems, temp_sibling, verify_bundle
from .config import BuildOptions, DimRanges
from .dims import fit_profiles, fit_warmups
from .engines import BuiltEngine, build_engines, plan_engines, trt_rtx_identity
from .onnx_model import LoadedModel, load_model, make_skeleton, write_normalized_model
from .output_dir import OutputDirError, check_output_dir, move_into_place
from .store_writer import DEFAULT_LEVEL, write_shared_store

__all__ = ["BuildOptions", "BuildResult", "ModelSpec", "OutputDirError", "Progress", "build_bundle"]

SKELETON_EXTERNAL_DATA = "weights.bin"
FitSpecs = Callable[[Sequence[tuple["ModelSpec", Sequence[TensorSpec]]]], Sequence["ModelSpec"]]


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
class ModelSpec:
    """One model of a bundle: its ONNX file and what is set per model (the rest of BuildOptions is bundle-wide)."""

    source: Path
    name: str | None = None  # default: the ONNX file's stem
    version: str = "0"
    profiles: tuple[Profile, ...] = ()
    dims: DimRanges = field(default_factory=dict)
    warmup_shapes: tuple[Mapping[str, Shape], ...] = ()

    @classmethod
    def from_options(cls, source: str | os.PathLike[str], options: BuildOptions) -> ModelSpec:
        """The single-model form: name, version and shapes from BuildOptions."""
        return cls(
            source=Path(source),
            name=options.name,
            version=options.version,
            profiles=options.profiles,
            dims=options.dims,
            warmup_shapes=options.warmup_shapes,
        )


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    bundle_dir: Path
    bundle: BundleManifest
    notes: tuple[str, ...] = ()  # e.g. why no weightless engine was built
    left_alone: tuple[str, ...] = ()  # files in the output directory that are not the bundle's (with force)
    seconds: dict[str, float] = field(default_factory=dict)  # per step, engines by label

    @property
    def manifest(self) -> Manifest:
        """The first model's view (the only one of a single-model bundle)."""
        return self.bundle.views()[0]

    @property
    def raw_weight_bytes(self) -> int:
        return sum(b.nbytes for b in self.bundle.weights.blobs)

    @property
    def stored_weight_bytes(self) -> int:
        return self.bundle.weights.file.size

    @property
    def engine_bytes(self) -> int:
        return sum(e.file.size for m in self.bundle.models for e in m.engines)


def build_bundle(
    onnx_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    options: BuildOptions,
    models: Sequence[ModelSpec] = (),
    progress: Progress | None = None,
    probe: Callable[[], Any] | None = None,
    fit_specs: FitSpecs | None = None,
) -> BuildResult:
    """Turn ``onnx_path`` (or ``models``, several ONNX files) into a verified bundle at ``out_dir``.

    With ``models`` every model gets its own skeleton, profiles, warm-ups, engines and parser verdict, and one weight
    store holds all their tensors: a tensor identical in bytes and dtype across models is stored once. Name,
    version and shapes then come from each ModelSpec, the rest of ``options`` applies to all.
    ``probe`` replaces runtime_shim.machine.probe when deciding on a weightless engine (tests). ``fit_specs`` gets
    each spec with its loaded model's inputs and returns the specs to build (the CLI's MODEL.INPUT names: model_options).
    A full or read-only disk is a BundleError naming the place; the temp directory is gone, ``out_dir`` unchanged.
    """
    specs = list(models) if models else [ModelSpec.from_options(_given(onnx_path), options)]
    with disk_errors(out_dir, "cannot write the bundle here", "nothing was written there"):
        return _build_bundle(specs, out_dir, options=options, progress=progress, probe=probe, fit_specs=fit_specs)


def _given(onnx_path: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    if onnx_path is None:
        raise ModelError("no model given", hint="pass an ONNX file")
    return onnx_path


@dataclass
class _Model:
    """One model while it is built."""

    spec: ModelSpec
    name: str
    loaded: LoadedModel
    profiles: tuple[Profile, ...]
    warmups: tuple[Mapping[str, Shape], ...]


def _build_bundle(
    specs: list[ModelSpec],
    out_dir: str | os.PathLike[str],
    *,
    options: BuildOptions,
    progress: Progress | None,
    probe: Callable[[], Any] | None,
    fit_specs: FitSpecs | None = None,
) -> BuildResult:
    progress = progress or _Quiet()
    # abspath: "." or "bundle/" must still give a real name and parent for the temp sibling directory.
    out = Path(os.path.abspath(out_dir))
    check_output_dir(out, force=options.force)
    seconds: dict[str, float] = {}
    notes: list[str] = []
    several = len(specs) > 1

    def timed(label: str) -> AbstractContextManager[Any]:
        return _Timed(progress.step(label), seconds, label)

    def note(message: str) -> None:
        notes.append(message)
        progress.note(message)

    _check_names(specs)
    loaded_models: list[LoadedModel] = []
    for spec in specs:
        with timed(f"load model {spec.name or spec.source.stem}" if several else "load model"):
            loaded_models.append(load_model(spec.source))
    if fit_specs is not None:
        specs = list(fit_specs([(s, m.inputs) for s, m in zip(specs, loaded_models)]))
    todo: list[_Model] = []
    for spec, loaded in zip(specs, loaded_models):
        name = spec.name or spec.source.stem
        # Before any file is written or engine built: a profile TRT-RTX would refuse costs nothing here.
        src = str(spec.source)
        profiles = fit_profiles(loaded, spec.profiles, spec.dims, source=src, note=note)
        warmups = fit_warmups(loaded.inputs, profiles, spec.warmup_shapes, source=src, note=note)
        todo.append(_Model(spec, name, loaded, profiles, warmups))
    plans = plan_engines(options, probe=probe, note=note)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, "building")
    placed = False
    try:
        with timed("write weight store"):
            index, tensors = write_shared_store(
                [m.loaded.weights for m in todo],
                tmp,
                encoding=options.encoding,
                level=options.level if options.level is not None else DEFAULT_LEVEL,
                threads=options.threads,
                progress=lambda done, total: progress.advance("write weight store", done, total),
            )
        version, flavour = trt_rtx_identity()
        bundle = BundleManifest(
            trt_rtx=TrtRtxTarget(version=version, cuda_flavour=flavour),
            weights=index,
            models=tuple(
                _build_model(
                    m, index.with_tensors(t), plans, tmp, out, timed, note, seconds, several, options.weightful
                )
                for m, t in zip(todo, tensors)
            ),
            creator=Creator(tool="trtx-bundler", version=__version__, created=_source_date_epoch()),
        )
        # Round-trip through the parser: what we write must be what every reader accepts.
        manifest_json = bundle.to_json()
        BundleManifest.from_json(manifest_json, source=f"{out}/{MANIFEST_NAME} (as built)")
        atomic_write(tmp / MANIFEST_NAME, manifest_json)
        with timed("verify"):
            raise_for_problems(verify_bundle(tmp), what=f"{out} (as built)")
        left_alone, unsigned = move_into_place(tmp, out, bundle)
        placed = True
        if unsigned:
            note(
                f"{out}: removed {SIGNATURE_NAME}: it signed the manifest this build replaced; "
                f"sign the bundle again (trtx-bundle sign {out} --key PRIVATE.pem)"
            )
    finally:
        if not placed:
            shutil.rmtree(tmp, ignore_errors=True)
    if left_alone:
        progress.note(
            f"{out}: left {len(left_alone)} file(s) that are not part of the bundle: {', '.join(left_alone[:5])}"
            + (" ..." if len(left_alone) > 5 else "")
        )
    return BuildResult(bundle_dir=out, bundle=bundle, notes=tuple(notes), left_alone=tuple(left_alone), seconds=seconds)


def _check_names(specs: Sequence[ModelSpec]) -> None:
    names = [s.name or s.source.stem for s in specs]
    for name in names:
        if names.count(name) > 1:
            files = ", ".join(str(s.source) for n, s in zip(names, specs) if n == name)
            raise ModelError(
                f"two models would be named {name!r} ({files}); each model of a bundle needs its own name",
                hint="name them with --name, once per file in the order given (or name = in each [[model]] table)",
            )


def _build_model(
    m: _Model,
    store: WeightStore,
    plans: Sequence[Any],
    tmp: Path,
    out: Path,
    timed: Callable[[str], AbstractContextManager[Any]],
    note: Callable[[str], None],
    seconds: dict[str, float],
    several: bool,
    weightful: bool,
) -> Model:
    """The skeleton and engines of one model (into ``tmp``), and its manifest record."""
    src = m.spec.source
    suffix = f" {m.name}" if several else ""
    with timed(f"write skeleton{suffix}"):
        skeleton_bytes = make_skeleton(m.loaded, store, SKELETON_EXTERNAL_DATA)
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
            with timed(f"write normalized model{suffix}"):
                model_file = write_normalized_model(
                    m.loaded, store, Path(norm_dir), SKELETON_EXTERNAL_DATA, skeleton=skeleton_bytes
                )
            try:
                built = build_engines(
                    Path(model_file),
                    m.profiles,
                    plans,
                    tmp,
                    step=(lambda label: timed(f"{label}{suffix}")) if several else timed,
                    source=str(src),
                    inputs=m.loaded.inputs,
                )
            except ModelParseError as e:
                if weightful:  # asked for an engine every user needs: the error says --no-weightful
                    raise
                # Only this GPU's weightless engine was planned: bundle for the fallback, as without a GPU.
                refused = e.verdict
    verdict = refused if refused is not None else None if built else _parse_verdict(src, timed, note)
    if refused is not None:
        note(_refused_note(src, refused))
    for b in built:
        label = f"engine {b.engine.kind} {b.engine.platform} {list(b.engine.compute_capabilities) or 'default'}"
        seconds[label + suffix] = b.seconds
    return Model(
        name=m.name,
        version=m.spec.version,
        source_sha256=m.loaded.source_sha256,
        opset=getattr(m.loaded, "opset", None),
        inputs=tuple(m.loaded.inputs),
        outputs=tuple(m.loaded.outputs),
        profiles=m.profiles,
        warmup_shapes=m.warmups,
        verdict=verdict,
        tensors=store.tensors,
        skeleton=Skeleton(file=ref, external_data=SKELETON_EXTERNAL_DATA),
        engines=tuple(b.engine for b in built),
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
