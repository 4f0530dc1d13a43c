"""The ONNX Runtime path, for machines TensorRT for RTX cannot serve: skeleton + weights from memory, run on the CPU.

Nothing is copied to disk and nothing is trusted from an earlier run. Every load reads the bundle's skeleton (checked
against its sha256) and every frame of the model's blobs (each checked against its digest before it is decoded;
blobs another live session of this process already read and checked are shared with it, read-only:
shared_weights.py), and hands ONNX Runtime the decoded tensors by name (``SessionOptions.add_external_initializers``). ONNX Runtime takes
initializers that way only for the top-level graph, and only those a node reads; a tensor elsewhere (a subgraph's,
an attribute's), one nothing reads, or one of a type numpy cannot carry (bfloat16, float8, int4) is written inline
into the in-memory copy of the skeleton instead.
Every external reference in the skeleton must name the bundle's weight layout at a blob's exact place, so the
skeleton and the manifest agree on what each tensor holds, and ONNX Runtime never looks for a file itself.

TensorRT for RTX's ONNX parser reads external data only from files: ``model_on_disk`` writes skeleton + unpacked
weights (this model's blobs; zeros where other models' sit) into a private temp dir for the length of one engine
build, from verified bytes each time, and removes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, IntegrityError
from .fsutil import open_regular_file, os_error_hint, owned_temp_dir, sha256_bytes, sweep_stale_temp_dirs
from .manifest import FileRef, Manifest
from .shared_weights import shared_blobs
from .skeleton_refs import ExternalRef, external_refs, inline_refs
from .store.format import HINT_CORRUPT, nbytes_for
from .store.reader import WeightReader, numpy_dtype
from .user_cache import UserCache

log = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"
TEMP_PREFIX = "trtx-model-"  # owned temp dirs of model_on_disk (swept when their owner is gone)
# ONNX Runtime resolves external data of a model given as bytes against this folder: one that cannot exist, so a
# reference the shim did not serve fails instead of reading a file from the current directory.
NO_EXTERNAL_DATA_DIR = os.path.join(os.devnull, "trtx-no-external-data")

# TensorProto.DataType -> the weight store's dtype name (the types a bundle can hold).
ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
    17: "float8e4m3fn",
    21: "uint4",
    22: "int4",
}
# Types ONNX Runtime's Python API takes as numpy arrays of the same element type; others go inline.
BY_NAME_DTYPES = frozenset(ONNX_DTYPES.values()) - {"bfloat16", "float8e4m3fn", "uint4", "int4"}


def read_verified(bundle_dir: Path, ref: FileRef, where: str) -> bytes:
    """The bytes of the bundle file pinned at ``where``, read once and checked: what is returned is what was hashed.

    A FIFO, a directory, a device or a file of another size than pinned is refused before anything is read.
    """
    path = bundle_dir / ref.path
    hint = "the file was modified or damaged: fetch the bundle again ('trtx-bundle verify' lists every bad file)"
    try:
        f, size = open_regular_file(path, f"the file pinned by {where}", error=IntegrityError)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing (pinned by {where})", hint="fetch the bundle again") from None
    with f:
        if size != ref.size:
            raise IntegrityError(
                f"{path}: {where} pins sha256 {ref.sha256} ({ref.size} bytes), the file has {size} bytes", hint=hint
            )
        try:
            data = f.read(ref.size + 1)  # one read into one buffer; the byte more shows a file that grew meanwhile
        except OSError as e:
            raise IntegrityError(f"{path}: cannot read ({e.strerror or e})", hint=os_error_hint(e)) from None
    actual = sha256_bytes(data)
    if len(data) != ref.size or actual != ref.sha256:
        raise IntegrityError(
            f"{path}: {where} pins sha256 {ref.sha256} ({ref.size} bytes), the file has {actual} ({len(data)} bytes)",
            hint=hint,
        )
    return data


# --------------------------------------------------------------------------- the skeleton's references, checked
@dataclass(frozen=True)
class _Ref:
    ref: ExternalRef
    blob: int  # the blob of the weight store it reads
    by_name: bool  # given to ONNX Runtime by name; else written inline into the skeleton


@dataclass(frozen=True)
class _Plan:
    skeleton: bytes
    where: str
    refs: list[_Ref]


def plan_skeleton(manifest: Manifest, bundle_dir: Path) -> _Plan:
    """The verified skeleton and, for each external reference in it, the blob it must read; IntegrityError where the
    skeleton points anywhere else, or where it and the manifest disagree on a tensor."""
    skeleton = read_verified(bundle_dir, manifest.skeleton.file, "skeleton.file")
    where = str(bundle_dir / manifest.skeleton.file.path)
    store = manifest.weights
    at = {b.raw_offset: i for i, b in enumerate(store.blobs) if b.nbytes}
    tensors = {t.name: t for t in store.tensors}
    layout = manifest.skeleton.external_data
    found, used = external_refs(skeleton, where)
    refs = []
    for ref in found:
        what = f"{where}: tensor {ref.name!r}"
        dtype = ONNX_DTYPES.get(ref.data_type)
        if ref.location != layout:
            raise IntegrityError(
                f"{what} keeps its data in {ref.location!r}, expected the weight layout {layout!r} (skeleton.external_data)",
                hint=HINT_CORRUPT,
            )
        index = at.get(ref.offset)
        if index is None or ref.length != store.blobs[index].nbytes:
            raise IntegrityError(
                f"{what} points at {ref.length} bytes at offset {ref.offset} of {layout}, which is no blob of the "
                "manifest's weight store (weights.blobs[*].raw_offset, nbytes)",
                hint=HINT_CORRUPT,
            )
        if dtype is None or any(d < 0 for d in ref.dims) or nbytes_for(dtype, ref.dims) != ref.length:
            raise IntegrityError(
                f"{what}: data type {ref.data_type} with shape {list(ref.dims)} does not fill its {ref.length} bytes",
                hint=HINT_CORRUPT,
            )
        if ref.main:
            t = tensors.get(ref.name)
            if t is None:
                raise IntegrityError(
                    f"{what}: not among the model's tensors in the manifest (models[].tensors)", hint=HINT_CORRUPT
                )
            if t.blob != index or t.dtype != dtype or tuple(t.shape) != ref.dims:
                raise IntegrityError(
                    f"{what}: the skeleton says {dtype} {list(ref.dims)} in blob {index}, the manifest "
                    f"{t.dtype} {list(t.shape)} in blob {t.blob} (the model's tensors)",
                    hint=HINT_CORRUPT,
                )
        refs.append(_Ref(ref, index, ref.main and dtype in BY_NAME_DTYPES and ref.name in used))
    return _Plan(skeleton, where, refs)


def _model_blobs(manifest: Manifest, plan: _Plan) -> list[int]:
    """The blobs this model's tensors and skeleton use: in a bundle of several models, the others' are theirs."""
    return sorted({t.blob for t in manifest.weights.tensors} | {r.blob for r in plan.refs})


# --------------------------------------------------------------------------- the model in memory
@dataclass
class InMemoryModel:
    """What ONNX Runtime opens: the skeleton's bytes (some tensors inlined) and the rest of the weights by name."""

    skeleton: bytes
    names: list[str]
    arrays: list[np.ndarray]  # must outlive the session: ONNX Runtime may refer to them
    source: str  # the skeleton's path, for messages
    _plan: _Plan
    _raw: dict[int, np.ndarray]  # every blob the model uses, decoded (shared_weights.py: held while this lives)

    def all_inline(self) -> bytes:
        """The skeleton with every external tensor inline: a whole model in one buffer, slower to open."""
        pending = iter(self._plan.refs)
        return inline_refs(self._plan.skeleton, self.source, lambda r: self._raw[next(pending).blob].tobytes())


def load_in_memory(manifest: Manifest, bundle_dir: Path, *, threads: int | None = None) -> InMemoryModel:
    """Read the skeleton and every frame of this model's blobs, verified, into an :class:`InMemoryModel`.

    Every blob of the model's tensors is read and checked, also those the skeleton holds inline: a damaged weight
    file fails every load that uses the damaged part. Blobs another session of this process holds (another model of
    the bundle, sharing them) are taken from it, read-only, not read again (shared_weights.py).
    """
    plan = plan_skeleton(manifest, bundle_dir)
    with WeightReader(bundle_dir, manifest.weights, threads=threads) as reader:  # checks every frame's digest
        # All kept, also the few small ones the skeleton holds inline: while this session lives, another model's
        # load that shares them does not read them again.
        raw = shared_blobs(reader, _model_blobs(manifest, plan))
    model = InMemoryModel(plan.skeleton, [], [], plan.where, plan, raw)
    for r in plan.refs:
        if r.by_name:
            model.names.append(r.ref.name)
            model.arrays.append(raw[r.blob].view(numpy_dtype(ONNX_DTYPES[r.ref.data_type])).reshape(r.ref.dims))
    if len(model.names) < len(plan.refs):
        pending = iter(plan.refs)  # inline_refs visits the references in the order external_refs found them

        def data_for(_: ExternalRef) -> bytes | None:
            r = next(pending)
            return None if r.by_name else raw[r.blob].tobytes()

        model.skeleton = inline_refs(plan.skeleton, plan.where, data_for)
    return model


# --------------------------------------------------------------------------- the model on disk, for TRT-RTX builds
def _temp_parent(user_cache: UserCache) -> Path:
    parent = user_cache.temp_dir()
    return parent if parent is not None else Path(tempfile.gettempdir())


@contextlib.contextmanager
def model_on_disk(manifest: Manifest, bundle_dir: Path, user_cache: UserCache) -> Iterator[Path]:
    """A runnable ONNX file (skeleton + unpacked weights) in a private temp dir, removed when the block ends.

    For TensorRT for RTX's parser, which reads external data from files. Written from verified bytes every time and
    never reused; the dir is locked while in use, so a later run removes it if this process is killed.
    """
    plan = plan_skeleton(manifest, bundle_dir)
    parent = _temp_parent(user_cache)
    sweep_stale_temp_dirs(parent, TEMP_PREFIX)
    with owned_temp_dir(parent, TEMP_PREFIX) as folder:
        (folder / MODEL_NAME).write_bytes(plan.skeleton)
        with WeightReader(bundle_dir, manifest.weights) as reader:  # checks every frame's sha256 as it decodes
            reader.unpack_raw(folder / manifest.skeleton.external_data, _model_blobs(manifest, plan))
        yield folder / MODEL_NAME


# --------------------------------------------------------------------------- the session
class OrtSession:
    """Runs the bundle's model with ONNX Runtime on the CPU; same run() contract as the TRT-RTX session."""

    def __init__(
        self, manifest: Manifest, bundle_dir: Path, user_cache: UserCache, *, threads: int | None = None
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError(
                f"ONNX Runtime is not installed ({e}), and it is needed to run this bundle here",
                hint="pip install 'trtx-bundler[onnxruntime]' (or onnxruntime)",
            ) from None
        user_cache.sweep_legacy_models()
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        model = load_in_memory(manifest, bundle_dir)
        self.source = model.source
        self.timings["weights_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            self.session, values = _open(ort, model.skeleton, model.names, model.arrays, threads)
            self._keep: tuple[Any, ...] | None = (model, values)  # what ONNX Runtime may refer to
        except Exception as e:
            if not model.names:
                raise BackendUnavailableError(f"{self.source}: ONNX Runtime could not load the model: {e}") from None
            # Taking tensors by name has limits (a subgraph that reuses an outer initializer's name, say): the whole
            # model in one buffer is slower to open but takes no tensor by name.
            log.info(
                "%s: ONNX Runtime did not take the weights by name (%s); opening the model with them inline",
                self.source,
                e,
            )
            try:
                self.session, _ = _open(ort, model.all_inline(), [], [], threads)
            except Exception:
                raise BackendUnavailableError(f"{self.source}: ONNX Runtime could not load the model: {e}") from None
            self._keep = None
        self.timings["ort_session_s"] = time.perf_counter() - t0
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray], profile: int = 0) -> dict[str, np.ndarray]:
        # Profiles matter to TRT-RTX only: ONNX Runtime runs any shape the graph allows.
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(inputs))))

    def close(self) -> None:
        # The session first: the arrays it may refer to go after it.
        self.session = None
        self._keep = None


def _open(
    ort: Any, skeleton: bytes, names: list[str], arrays: list[np.ndarray], threads: int | None
) -> tuple[Any, list[Any]]:
    """(an ONNX Runtime session of the skeleton with ``arrays`` as its initializers ``names``, the OrtValues over them)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", NO_EXTERNAL_DATA_DIR)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if values:
        options.add_external_initializers(names, values)
    return ort.InferenceSession(skeleton, options, providers=["CPUExecutionProvider"]), values
