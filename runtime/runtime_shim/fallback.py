"""The ONNX Runtime path, for machines TensorRT for RTX cannot serve: skeleton + unpacked weights, run on the CPU.

The model is materialized once per weight store into the user cache dir (content-addressed: lock, check again,
rename), so later loads cost only ONNX Runtime's own start. Needs the optional extra ``onnxruntime``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import BackendUnavailableError, CacheError, IntegrityError
from .fsutil import sha256_bytes, sha256_file
from .manifest import FileRef, Manifest
from .store.reader import WeightReader
from .user_cache import UserCache

log = logging.getLogger(__name__)

MODEL_NAME = "model.onnx"


def read_verified(bundle_dir: Path, ref: FileRef, where: str) -> bytes:
    """The bytes of the bundle file pinned at ``where``, read once and checked: what is returned is what was hashed."""
    path = bundle_dir / ref.path
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing (pinned by {where})", hint="fetch the bundle again") from None
    actual, size = sha256_bytes(data), len(data)
    if size != ref.size or actual != ref.sha256:
        raise IntegrityError(
            f"{path}: {where} pins sha256 {ref.sha256} ({ref.size} bytes), the file has {actual} ({size} bytes)",
            hint="the file was modified or damaged: fetch the bundle again ('trtx-bundle verify' lists every bad file)",
        )
    return data


def model_folder_name(manifest: Manifest) -> str:
    # Keyed by the weight store's hash (the big part) and the skeleton's: same content, same folder, any bundle path.
    return f"{manifest.weights.file.sha256[:32]}-{manifest.skeleton.file.sha256[:12]}"


def materialize_model(manifest: Manifest, bundle_dir: Path, user_cache: UserCache) -> tuple[Path, Path | None]:
    """(path of a runnable ONNX model, private temp dir to delete on close or None). Verifies what it copies."""
    skeleton = read_verified(bundle_dir, manifest.skeleton.file, "skeleton.file")

    def fill(folder: Path) -> None:
        (folder / MODEL_NAME).write_bytes(skeleton)  # a fresh private folder: nobody reads it before it is complete
        with WeightReader(bundle_dir, manifest.weights) as reader:  # checks every frame's sha256 as it decodes
            reader.unpack_raw(folder / manifest.skeleton.external_data)

    try:
        folder = user_cache.materialize(model_folder_name(manifest), fill)
        if _intact(folder, manifest):
            return folder / MODEL_NAME, None
        log.warning("%s: the materialized model is damaged; rebuilding it in a private temp dir", folder)
    except CacheError as e:
        log.info("model not kept in the user cache (%s); unpacking to a temp dir for this session", e)
    tmp = Path(tempfile.mkdtemp(prefix="trtx-model-"))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp / MODEL_NAME, tmp


def _intact(folder: Path, manifest: Manifest) -> bool:
    # The skeleton is small: re-hash it. The weights file was written from verified frames: its size suffices.
    try:
        sha, _ = sha256_file(folder / MODEL_NAME)
        return (
            sha == manifest.skeleton.file.sha256
            and (folder / manifest.skeleton.external_data).stat().st_size == manifest.weights.raw_size
        )
    except OSError:
        return False


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
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.model_path, self._tmp = materialize_model(manifest, bundle_dir, user_cache)
        self.timings["materialize_s"] = time.perf_counter() - t0
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            self.close()
            raise BackendUnavailableError(f"{self.model_path}: ONNX Runtime could not load the model: {e}") from None
        self.timings["ort_session_s"] = time.perf_counter() - t0
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray], profile: int = 0) -> dict[str, np.ndarray]:
        # Profiles matter to TRT-RTX only: ONNX Runtime runs any shape the graph allows.
        return dict(zip(self.output_names, self.session.run(self.output_names, dict(inputs))))

    def close(self) -> None:
        self.session = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
