"""Bundle integrity: verify every pinned file of every model (presence, type, size, sha256, contents, extras).

The one-file form (pack, unpack) lives in archive.py.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime_shim.errors import IntegrityError, ManifestError, SchemaVersionError
from runtime_shim.fsutil import sha256_file
from runtime_shim.manifest import MANIFEST_NAME, BundleManifest, Manifest, read_bundle_manifest
from runtime_shim.signing import SIGNATURE_NAME


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One thing wrong with a bundle.

    ``kind``: schema | missing | truncated | size | changed | extra | not-a-file | index (the skeleton and the weight
    index disagree) | engine | warning (not fatal).
    """

    kind: str
    path: str  # the file (relative to the bundle) or manifest key it is about
    message: str
    hint: str | None = None

    @property
    def fatal(self) -> bool:
        return self.kind != "warning"

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "path": self.path, "message": self.message, "hint": self.hint}


# --------------------------------------------------------------------------- verify
HeaderCheck = Callable[[bytes], "tuple[str, int]"]  # TrtRuntime.engine_validity: (validity name, diagnostics bits)
# Diagnostics that say the file itself is bad; the rest (wrong SM, old driver, ...) only say it cannot run *here*.
_BAD_ENGINE_BITS = {1: "built by another TRT-RTX version", 32: "malformed engine"}


def verify_bundle(bundle_dir: str | os.PathLike[str], *, header_check: HeaderCheck | None = None) -> list[Problem]:
    """Every problem with the bundle: the schema, each pinned file's presence, size and sha256, and extra files.

    An empty list means the bundle is intact. Warnings (unknown manifest keys from a newer minor) are not fatal.
    ``header_check`` (TRT-RTX's engine validity, where a supported GPU is present) adds a look at each intact
    engine's header: a malformed engine or one from another TRT-RTX version is a problem.
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        return [
            Problem(
                kind="missing",
                path=str(root),
                message="not a directory",
                hint="pass the bundle directory (or 'unpack' an archive first)",
            )
        ]
    try:
        bundle, warnings, _sha = read_bundle_manifest(root)
    except SchemaVersionError as e:
        return [Problem(kind="schema", path=MANIFEST_NAME, message=str(e), hint=e.hint)]
    except ManifestError as e:
        return [
            Problem(
                kind="schema", path=MANIFEST_NAME, message=str(e), hint=e.hint or "rebuild the bundle or fetch it again"
            )
        ]
    problems = [Problem(kind="warning", path=MANIFEST_NAME, message=w) for w in warnings]
    for key, ref in bundle.files():  # every pinned file once, whichever models share it
        file_problems = _check_file(root, key, ref.path, ref.size, ref.sha256)
        problems += file_problems
        if header_check is not None and ref.path.startswith("engines/") and not file_problems:
            problems += _check_header(root, key, ref.path, header_check)
    problems += _check_contents(root, bundle, {p.path for p in problems})
    for rel in unlisted_files(root, bundle):
        if rel == SIGNATURE_NAME:
            continue  # the signature is the one file the manifest cannot pin; bundler/sign.py checks it
        problems.append(
            Problem(
                kind="extra",
                path=rel,
                message="not listed in the manifest",
                hint="remove it, or rebuild the bundle; only files the manifest pins belong in a bundle",
            )
        )
    return problems


def check_pinned_files(
    root: Path, manifest: Manifest | BundleManifest, *, only: set[str] | None = None
) -> list[Problem]:
    """The problems of the files ``manifest`` pins under ``root`` (type, size, then sha256), or of ``only`` those paths."""
    problems: list[Problem] = []
    for key, ref in manifest.files():
        if only is None or ref.path in only:
            problems += _check_file(root, key, ref.path, ref.size, ref.sha256)
    return problems


def unlisted_files(root: Path, manifest: Manifest | BundleManifest) -> list[str]:
    """Entries under ``root`` that ``manifest`` does not pin (manifest.json itself aside), sorted; nothing is hashed."""
    pinned = {MANIFEST_NAME} | {ref.path for _, ref in manifest.files()}
    return [rel for rel in _walk(root) if rel not in pinned]


def _check_file(root: Path, key: str, rel: str, size: int, sha256: str) -> list[Problem]:
    path = root / rel
    try:
        st = path.lstat()
    except FileNotFoundError:
        return [
            Problem(kind="missing", path=rel, message=f"missing (pinned by {key})", hint="fetch or rebuild the bundle")
        ]
    if not stat.S_ISREG(st.st_mode):
        return [
            Problem(
                kind="not-a-file", path=rel, message=f"not a regular file (pinned by {key}); links are not followed"
            )
        ]
    if st.st_size < size:
        return [
            Problem(
                kind="truncated",
                path=rel,
                message=f"truncated: {st.st_size} bytes, expected {size} ({key}.size)",
                hint="the copy or download was cut short; fetch the bundle again",
            )
        ]
    if st.st_size > size:
        return [
            Problem(
                kind="size",
                path=rel,
                message=f"{st.st_size} bytes, expected {size} ({key}.size)",
                hint="the file was changed after the bundle was built; rebuild or fetch it again",
            )
        ]
    actual, _size = sha256_file(path)
    if actual != sha256:
        return [
            Problem(
                kind="changed",
                path=rel,
                message=f"sha256 {actual}, expected {sha256} ({key}.sha256): content changed",
                hint="the file was altered; rebuild or fetch the bundle again",
            )
        ]
    return []


def _check_skeleton_model(rel: str, skeleton: bytes) -> list[Problem]:
    """The skeleton as a model ONNX Runtime could open: it parses, and has an IR version, an opset and a graph with
    outputs (an empty file re-pinned parses as an empty model). onnx.checker is not used: it insists on reading the
    external data files, which are the weight store's blobs, not files."""
    import onnx

    try:
        model = onnx.load_model_from_string(skeleton)
        missing = [
            what
            for what, ok in (
                ("ir_version", model.ir_version > 0),
                ("opset_import", len(model.opset_import) > 0),
                ("graph.output", len(model.graph.output) > 0),
            )
            if not ok
        ]
    except Exception as e:  # protobuf's DecodeError and kin: any means "not a model"
        missing = [f"a model ({type(e).__name__}: {e})"]
    if not missing:
        return []
    return [
        Problem(
            kind="index",
            path=rel,
            message=f"not an ONNX model ONNX Runtime could open: no {', '.join(missing)}",
            hint="fetch the bundle again, or rebuild it with 'trtx-bundle build'",
        )
    ]


def _check_contents(root: Path, bundle: BundleManifest, damaged: set[str]) -> list[Problem]:
    """What loading would find in the intact skeletons and weight file, checked by the shim's own code so that verify
    and load() can never disagree: every external reference of each model's skeleton against that model's tensors
    (fallback.plan_skeleton), and every frame of the shared weight file against its digest, decoded, each blob against
    its raw sha256, once for all models (the index's own consistency is checked when the manifest is parsed). Files
    in ``damaged`` already have a problem and are not read again."""
    from runtime_shim.errors import BundleError
    from runtime_shim.store.reader import WeightReader

    problems: list[Problem] = []
    checked: dict[tuple[str, tuple[object, ...]], list[Problem]] = {}
    if bundle.weights.file.path not in damaged:
        for i, view in enumerate(bundle.views()):
            rel = view.skeleton.file.path
            if rel in damaged:
                continue
            # Models with the same skeleton and the same tensors (thousands, in a hostile manifest) are checked once.
            seen = checked.get(same := (rel, view.weights.tensors))
            if seen is None:
                seen = checked[same] = _check_skeleton(root, view)
            problems += [
                dataclasses.replace(p, message=f"models[{i}] ({view.model.name!r}): {p.message}") for p in seen
            ]
        try:
            with WeightReader(root, bundle.weights.with_tensors(()), verify_raw=True) as reader:
                for _ in reader.iter_blobs():
                    pass
        except BundleError as e:
            problems.append(Problem(kind="changed", path=bundle.weights.file.path, message=str(e), hint=e.hint))
    return problems


def _check_skeleton(root: Path, view: Manifest) -> list[Problem]:
    from runtime_shim.errors import BundleError
    from runtime_shim.fallback import plan_skeleton

    try:
        plan = plan_skeleton(view, root)
    except BundleError as e:
        return [Problem(kind="index", path=view.skeleton.file.path, message=str(e), hint=e.hint)]
    return _check_skeleton_model(view.skeleton.file.path, plan.skeleton)


def _check_header(root: Path, key: str, rel: str, header_check: HeaderCheck) -> list[Problem]:
    with open(root / rel, "rb") as f:
        header = f.read(64)  # Runtime.engine_header_size in TRT-RTX 1.7
    validity, bits = header_check(header)
    bad = [text for bit, text in _BAD_ENGINE_BITS.items() if bits & bit]
    if not bad:
        return []
    return [
        Problem(
            kind="engine",
            path=rel,
            message=f"TRT-RTX says the engine is {validity} ({', '.join(bad)}; {key})",
            hint="rebuild the bundle with the TRT-RTX version in manifest.json trt_rtx.version",
        )
    ]


def _walk(root: Path) -> list[str]:
    """Every non-directory entry under root (links included, never followed), as sorted posix paths."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        # A link to a directory shows up in dirnames; report it like any other stray entry.
        for name in list(dirnames):
            if (Path(dirpath) / name).is_symlink():
                out.append((rel_dir / name).as_posix())
        out += [(rel_dir / n).as_posix() for n in filenames]
    return sorted(out)


def raise_for_problems(problems: list[Problem], *, what: str) -> None:
    fatal = [p for p in problems if p.fatal]
    if fatal:
        shown = "\n  ".join(str(p) for p in fatal[:10])
        more = f"\n  ... and {len(fatal) - 10} more" if len(fatal) > 10 else ""
        raise IntegrityError(
            f"{what}: {len(fatal)} problem(s):\n  {shown}{more}", hint=next((p.hint for p in fatal if p.hint), None)
        )


def temp_sibling(path: Path, tag: str) -> Path:
    """A new, unique, hidden directory beside ``path``. Plain mkdir, not mkdtemp: mkdtemp's mode 0700 would stick to
    the bundle once the directory is renamed into place, while mkdir gives the user's usual mode (umask)."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: cannot create a unique temp directory")  # pragma: no cover


# --------------------------------------------------------------------------- inspect
def describe_bundle(bundle_dir: str | os.PathLike[str], *, model: str | None = None) -> dict[str, Any]:
    """The summary `inspect` shows: every model and the bytes they share (describe.py; ``model`` narrows it)."""
    from .describe import describe_bundle as describe

    return describe(bundle_dir, model=model)
