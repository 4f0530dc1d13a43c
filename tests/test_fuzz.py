"""Fuzzing bundles, manifests, weight frames, archives and farm parts built from real ONNX models (issue 11).

Every outcome must be a clean error (a BundleError from the library; one 'ERROR' line and exit 1 from the CLI) or
correct output (ONNX Runtime's outputs on the original model, through runtime_shim.load with the fallback), with no
traceback, MemoryError, RecursionError or hang, nothing written outside the temp dir and no existing data lost.
tests/fuzzing.py holds the mutations, the worker process and the judge; this module the corpus, the cases of the
frame, archive and part families, and the test. The seed is fixed; the CI budget is a few hundred cases.
TRTX_FUZZ_BUDGET=600s (seconds) or =5000 (cases) runs longer; TRTX_FUZZ_REPORT=FILE writes every outcome as JSON.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests import models
from tests.fuzzing import (
    BYTE_MUTATIONS,
    JSON_MUTATIONS,
    LENGTH_MUTATIONS,
    MANIFEST_EXTRAS,
    TAR_MUTATIONS,
    TYPE_MUTATIONS,
    Case,
    Outcome,
    Runner,
    Worker,
    _sha,
    budget_from_env,
    mutate_bytes,
    mutate_json,
    retype,
    snapshot,
)

SEED = 11
CI_CASES = 350  # random cases on top of the systematic ones; the whole test stays well under a minute on 2 cores
DEADLINE_S = 15.0  # a case takes milliseconds; one that has not answered by then hangs


def make_mlp_big(dir: Path) -> Path:
    """The MLP with a 256x512 first layer: its exponent plane is chunked, so chunk tables reach the reader and load."""
    from onnx import TensorProto

    graph = models._mlp_graph("mlp_big", TensorProto.FLOAT, np.float32, "batch", seed=3, d_in=256, d_hidden=512)
    return models._save(models._model(graph), dir, "mlp_big")


MODELS = {  # name: (factory, --shape, the input's opt shape)
    "mlp": (models.make_mlp, ["x=1x64:4x64:16x64"], (4, 64)),
    "mlp_fp16": (models.make_mlp_fp16, ["x=1x64:4x64:16x64"], (4, 64)),
    "mlp_big": (make_mlp_big, ["x=1x256:4x256:16x256"], (4, 256)),
}
BUNDLE_OPS = ("load", "verify", "inspect", "run")

# Bad outcomes found by this fuzzer in files other helpers own in this round, each with the reason it is known.
# The coordinator empties this list as those fixes land: each entry names its case exactly (Case.key), so nothing
# else is excused. Under TRTX_FUZZ_BUDGET the known cases run too (and are reported as bad).
KNOWN: dict[str, str] = {}


# --------------------------------------------------------------------------- the corpus
@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnxruntime as ort

    from bundler.archive import pack_bundle
    from bundler.build import build_bundle
    from bundler.config import make_options

    root = tmp_path_factory.mktemp("fuzz-corpus")
    for name, (factory, shapes, opt) in MODELS.items():
        model = factory(root / name / "model")
        bundle = root / name / "bundle"
        build_bundle(
            model, bundle, options=make_options(shapes=shapes, sms=[86, 89]), probe=lambda: SimpleNamespace(gpus=())
        )
        pack_bundle(bundle, root / name / "archive.trtx")
        inputs = models.sample_inputs(name, {"x": (opt, opt, opt)}, model)
        outputs = dict(
            zip(["y"], ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, inputs))
        )
        arrays: dict[str, Any] = {f"in.{k}": v for k, v in inputs.items()}
        arrays.update({f"out.{k}": v for k, v in outputs.items()})
        np.savez(root / name / "ref.npz", **arrays)
    return root


# --------------------------------------------------------------------------- the cases
def systematic() -> list[Case]:
    """Every file of a bundle, an archive and a part replaced by every other kind of file, under every operation."""
    cases = [Case("file", "weights", "none", op, 0, model) for model in MODELS for op in (*BUNDLE_OPS, "load-warm")]
    cases += [Case("archive", "archive", "none", op, 0, model) for model in MODELS for op in ("unpack", "cli-unpack")]
    cases += [Case("part", "part-file", "none", op, 0, model) for model in MODELS for op in ("merge", "merge-out")]
    cases += [
        Case("frame", f"blob{k}", "none", op, 0, model)
        for model in MODELS
        for k in range(4)
        for op in ("decoders", "reader")
    ]
    cases += [
        Case("file", target, mutation, op)
        for target in ("manifest", "skeleton", "weights", "engine")
        for mutation in TYPE_MUTATIONS
        for op in (*BUNDLE_OPS, "load-warm")
    ]
    cases += [Case("archive", "archive", "none", op, 0, model) for model in MODELS for op in ARCHIVE_READS]
    cases += [
        Case("archive", "archive", m, op) for m in TYPE_MUTATIONS for op in ("unpack", "cli-unpack", *ARCHIVE_READS)
    ]
    cases += [
        Case("part", t, m, op)
        for t in ("part.json", "part-file")
        for m in TYPE_MUTATIONS
        for op in ("merge", "cli-merge")
    ]
    return cases


def random_case(rng: random.Random, seed: int) -> Case:
    model = rng.choice(list(MODELS))
    family = rng.choices(("file", "manifest", "frame", "archive", "part"), (30, 25, 20, 15, 10))[0]
    if family == "file":
        mutation = rng.choice((*BYTE_MUTATIONS, *LENGTH_MUTATIONS, "mmap-flip"))
        target = rng.choice(("manifest", "skeleton", "weights", "weights", "engine", "cache"))
        if target == "cache":
            return Case("file", target, mutation, "load-warm", seed, model)
        if target != "manifest" and mutation != "mmap-flip" and rng.random() < 0.4:
            mutation += "+repin"
        ops = (*BUNDLE_OPS, "load-always", "load-warm", "load-then-pristine")
        return Case("file", target, mutation, rng.choice(ops), seed, model)
    if family == "manifest":
        mutation = rng.choice(JSON_MUTATIONS + MANIFEST_EXTRAS)
        target = rng.choice(("weights", "weights", "")) if mutation in JSON_MUTATIONS else "weights"
        op = rng.choice((*BUNDLE_OPS, "load-then-pristine"))
        return Case("manifest", target or "any", mutation, op, seed, model)
    if family == "frame":
        target = rng.choice(("blob0", "blob1", "blob2", "blob3", "chunked"))
        op = "decoders" if target == "chunked" else rng.choice(("decoders", "decoders", "reader", "load"))
        return Case("frame", target, rng.choice(BYTE_MUTATIONS + LENGTH_MUTATIONS), op, seed, model)
    if family == "archive":
        mutation = rng.choice(BYTE_MUTATIONS + LENGTH_MUTATIONS + TAR_MUTATIONS + TAR_MUTATIONS)
        op = rng.choice(("unpack", "unpack-existing", "cli-unpack", "cli-unpack-empty", *ARCHIVE_READS))
        return Case("archive", "archive", mutation, op, seed, model)
    target = rng.choice(("part.json", "part.json", "part-file", "bundle"))
    if target == "part.json":
        mutation = rng.choice(JSON_MUTATIONS)
    elif target == "bundle":  # the bundle merged into is damaged: merge must not carry it forward
        mutation = rng.choice((*BYTE_MUTATIONS, *LENGTH_MUTATIONS, *TYPE_MUTATIONS))
    else:
        mutation = rng.choice(BYTE_MUTATIONS + LENGTH_MUTATIONS) + rng.choice(("", "+repin"))
    return Case(
        "part", target, mutation, rng.choice(("merge", "merge-out", "merge-existing", "cli-merge")), seed, model
    )


# --------------------------------------------------------------------------- frames, through both decoders
_CHUNKED: dict[str, Any] = {}


def _chunked_frame() -> tuple[bytes, str, int, int, bytes]:
    """A layout-2 float32 frame whose exponent plane is chunked (as conftest.chunked_frame makes it)."""
    if not _CHUNKED:
        from bundler.store_writer import encode_frame

        values = (np.random.default_rng(9).standard_normal(100_000) * 0.02).astype(np.float32).tobytes()
        _CHUNKED["frame"] = (encode_frame(values, "zstd-byteplane", 4, 3), "zstd-byteplane", 4, len(values), values)
    return _CHUNKED["frame"]


def decode_everywhere(
    stored: bytes, enc: str, es: int, raw: int, before: bytes = b"", after: bytes = b""
) -> dict[str, Any]:
    """The host decoder with and without the C helper, and the GPU planner (run on the host by the reference of
    nvCOMP and the plane kernel) on the frame alone and, given the bytes around it in its file, on the frame among
    its neighbours (nothing outside the frame may be read): each name -> the decoded bytes, or ("refused", why)."""
    import zstandard

    from runtime_shim.store.decode import decode_frame_into, native_built, use_native

    places = {"": (b"", b"")}
    if before or after:
        places["-in-file"] = (before, after)
    got: dict[str, Any] = {}
    for native in (True, False) if native_built() else (False,):
        name = "native" if native else "numpy"
        was_native = use_native(native)
        try:
            out = bytearray(raw)
            try:
                decode_frame_into(stored, enc, es, memoryview(out))
                got[f"host-{name}"] = bytes(out)
            except (ValueError, zstandard.ZstdError) as e:
                got[f"host-{name}"] = ("refused", f"{type(e).__name__}: {e}"[:120])
            for where, (head, tail) in places.items():
                got[f"planner{where}-{name}"] = _plan_on_host(
                    head + stored + tail, len(head), len(stored), raw, es, enc
                )
        finally:
            use_native(was_native)
    return got


def _plan_on_host(buf_bytes: bytes, at: int, size: int, raw: int, es: int, enc: str) -> Any:
    """One frame at ``at`` in ``buf_bytes``, planned, cut and run as the GPU would: its bytes, or ("refused", why)."""
    import zstandard

    from runtime_shim.gpu.planner import ENCODINGS, Cuts, FrameFormatError, plan_frames
    from tests.test_gpu_decode import run_plan_on_host

    def col(x: int) -> Any:
        return np.array([x], dtype=np.int64)

    buf = np.frombuffer(buf_bytes, dtype=np.uint8)
    try:
        plan = plan_frames(buf, col(at), col(size), col(raw), col(es), col(ENCODINGS[enc]), col(0))
        cut = Cuts(plan, [(0, 1)], col(0)).cut(0, 1, buf)
    except FrameFormatError as e:
        return ("refused", f"FrameFormatError: {e}"[:120])
    dev = np.zeros(raw, dtype=np.uint8)
    try:
        run_plan_on_host(cut, buf, dev)
    except zstandard.ZstdError as e:  # sound headers, corrupt entropy data: nvCOMP reports a bad status
        return ("refused", f"nvCOMP status (reference ZstdError): {e}"[:120])
    return dev.tobytes()


def _frame_of(r: Runner, case: Case) -> tuple[bytes, str, int, int, bytes, dict[str, Any] | None]:
    if case.target == "chunked":
        return (*_chunked_frame(), None)
    doc = json.loads((r.corpus / case.model / "bundle" / "manifest.json").read_text())
    blob = doc["weights"]["blobs"][int(case.target[4:])]
    f = blob["frames"][0]
    data = (r.corpus / case.model / "bundle" / doc["weights"]["file"]["path"]).read_bytes()
    stored = data[f["offset"] : f["offset"] + f["size"]]
    from runtime_shim.store.decode import decode_frame_into

    raw = bytearray(f["raw_size"])
    decode_frame_into(stored, blob["encoding"], blob["element_size"], memoryview(raw))
    return stored, blob["encoding"], blob["element_size"], f["raw_size"], bytes(raw), doc


def _around(r: Runner, case: Case) -> tuple[bytes, bytes]:
    """The bytes of the weight file before and after the case's frame (none for the test frame)."""
    if case.target == "chunked":
        return b"", b""
    doc = json.loads((r.corpus / case.model / "bundle" / "manifest.json").read_text())
    f = doc["weights"]["blobs"][int(case.target[4:])]["frames"][0]
    data = (r.corpus / case.model / "bundle" / doc["weights"]["file"]["path"]).read_bytes()
    return data[: f["offset"]], data[f["offset"] + f["size"] :]


def frame_case(r: Runner, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
    stored, enc, es, raw, original, doc = _frame_of(r, case)
    head = rng.random() < 0.5  # half the cases in the frame's headers and tables, where the decoders' rules are
    mutated, desc = mutate_bytes(stored, case.mutation, rng, 0, min(len(stored), 48) if head else len(stored))
    around = _around(r, case)
    got = decode_everywhere(mutated, enc, es, raw, *around)
    decoded = {v for v in got.values() if isinstance(v, bytes)}
    refused = [k for k, v in got.items() if not isinstance(v, bytes)]
    if len(decoded) > 1 or (decoded and refused):
        summary = {k: v if not isinstance(v, bytes) else f"{len(v)} bytes, sha {_sha(v)[:12]}" for k, v in got.items()}
        return Outcome("bad", "the decoders disagree", f"{case.target}: {desc}; {summary}")
    if case.op == "decoders":
        note = "refused" if refused else "same bytes" if decoded == {original} else "decoded to other bytes"
        return Outcome("error" if refused else "ok", f"{note}: {got[refused[0]][1] if refused else ''}", desc)
    assert doc is not None
    bundle = r._copy_bundle(case.model, case_dir)
    _rewrite_frame(bundle, doc, int(case.target[4:]), mutated)
    same = decoded == {original}
    if case.op == "reader":
        outcome = _reader(r, bundle, int(case.target[4:]), original, same)
    else:
        outcome = r.load(bundle, case.model, case_dir, check=same or bool(refused))
        if refused and outcome.kind == "ok":
            outcome = Outcome("bad", "a frame every decoder refuses was loaded")
    outcome.detail = f"{case.target}: {desc} (frame and file hashes re-pinned); {outcome.detail}"
    return outcome


def _rewrite_frame(bundle: Path, doc: dict[str, Any], k: int, mutated: bytes) -> None:
    """Put ``mutated`` in place of blob k's first frame, move the frames after it, re-pin every hash it touches."""
    w = doc["weights"]
    path = bundle / w["file"]["path"]
    data = path.read_bytes()
    f = w["blobs"][k]["frames"][0]
    at, size, delta = f["offset"], f["size"], len(mutated) - f["size"]
    data = data[:at] + mutated + data[at + size :]
    for blob in w["blobs"]:
        for g in blob["frames"]:
            if g["offset"] > at:
                g["offset"] += delta
    f["size"], f["digest"] = len(mutated), models.frame_digest(doc, mutated)
    path.unlink()
    new = path.with_name(_sha(data) + path.suffix)
    new.write_bytes(data)
    w["file"]["path"] = str(new.relative_to(bundle))
    w["file"]["sha256"], w["file"]["size"] = _sha(data), len(data)
    (bundle / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))


def _reader(r: Runner, bundle: Path, k: int, original: bytes, same: bool) -> Outcome:
    from runtime_shim.manifest import read_manifest
    from runtime_shim.store.decode import native_built, use_native
    from runtime_shim.store.reader import WeightReader

    outcomes = []
    for native in (True, False) if native_built() else (False,):
        before = use_native(native)
        try:

            def read_all() -> dict[str, Any]:
                with WeightReader(bundle, read_manifest(bundle)[0].weights) as reader:
                    return {str(i): bytes(view) for i, view in reader.iter_blobs()}

            got: list[dict[str, Any]] = []

            def call(got: list[dict[str, Any]] = got) -> None:
                got.append(read_all())

            outcome = r.judge(call)
            if outcome.kind == "ok" and same and got[0].get(str(k)) != original:
                outcome = Outcome("bad", "the reader returned other bytes than every decoder gives")
            outcomes.append(outcome)
        finally:
            use_native(before)
    bad = [o for o in outcomes if o.kind == "bad"]
    return bad[0] if bad else outcomes[0]


# --------------------------------------------------------------------------- archives
def _tar_entries(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _raw_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """Headers as given (sizes may lie about the data after them), each member's data padded to 512 bytes."""
    out = bytearray()
    for info, data in entries:
        out += info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out += data + b"\0" * (-len(data) % 512)
    return bytes(out + b"\0" * 1024)


def mutate_tar(archive: Path, mutation: str, rng: random.Random, escape_to: Path) -> str:
    entries = _tar_entries(archive)
    i = rng.randrange(len(entries))
    info, data = entries[i]
    was = info.name
    if mutation in ("member-fifo", "member-dir", "member-chardev"):
        info.type = {"member-fifo": tarfile.FIFOTYPE, "member-dir": tarfile.DIRTYPE, "member-chardev": tarfile.CHRTYPE}[
            mutation
        ]
        info.size, data, info.devmajor, info.devminor = 0, b"", 1, 5
    elif mutation in ("member-symlink", "member-hardlink"):
        info.type = tarfile.SYMTYPE if mutation == "member-symlink" else tarfile.LNKTYPE
        info.linkname = rng.choice(("/dev/zero", "../escaped", entries[(i + 1) % len(entries)][0].name, str(escape_to)))
        info.size, data = 0, b""
    elif mutation == "member-dotdot":
        info.name = "../escaped-" + info.name.replace("/", "-")
    elif mutation == "member-absolute":
        info.name = str(escape_to / info.name.replace("/", "-"))
    elif mutation == "member-duplicate":
        other = tarfile.TarInfo(info.name)
        other.size, other_data = len(data), rng.randbytes(len(data))
        entries.insert(rng.randrange(len(entries) + 1), (other, other_data))
    elif mutation == "member-rename":
        info.name = rng.choice(("weights/evil.bin", "manifest.json", "engines/", "a/b/c/d", info.name + ".x"))
    elif mutation == "member-size-lie":
        info.size = max(0, len(data) + rng.choice((-512, -1, 1, 512, 1 << 33)))
    else:
        raise ValueError(mutation)
    entries[i] = (info, data)
    archive.write_bytes(_raw_tar(entries))
    return f"{mutation} on member {was!r}"


ARCHIVE_READS = {"load-archive": "load", "verify-archive": "verify", "inspect-archive": "inspect", "run-archive": "run"}


def archive_case(r: Runner, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
    from bundler.archive import unpack_bundle

    src = case_dir / "archive.trtx"
    shutil.copyfile(r.corpus / case.model / "archive.trtx", src)
    if case.mutation in TYPE_MUTATIONS:
        desc = retype(src, case.mutation)
    elif case.mutation in TAR_MUTATIONS:
        desc = mutate_tar(src, case.mutation, rng, case_dir)
    elif case.mutation != "none":
        data = src.read_bytes()
        hi = min(len(data), 4096) if rng.random() < 0.5 else len(data)  # half the cases in the first headers
        data, desc = mutate_bytes(data, case.mutation, rng, 0, hi)
        src.write_bytes(data)
    else:
        desc = "unchanged"
    if case.op in ARCHIVE_READS:  # read-only commands and load() take the archive itself
        outcome = r.bundle_op(ARCHIVE_READS[case.op], src, case.model, case_dir)
        if case.op == "load-archive" and outcome.kind != "bad":  # the second load reuses what the first unpacked
            again = r.bundle_op("load", src, case.model, case_dir)
            if again.kind != outcome.kind:
                outcome = Outcome("bad", f"a second load of the archive: {again.what}, the first: {outcome.what}")
        outcome.detail = f"{desc}; {outcome.detail}"
        return outcome
    out = case_dir / ("precious" if case.op == "unpack-existing" else "out")
    if case.op == "cli-unpack-empty":
        out.mkdir()
    if case.op.startswith("cli-"):
        outcome = r.cli("unpack", str(src), "-o", str(out))
    else:
        outcome = r.judge(lambda: unpack_bundle(src, out))
    if outcome.kind == "ok":
        if case.op == "unpack-existing":
            outcome = Outcome("bad", "unpacked into a directory that held files")
        else:
            outcome = r.load(out, case.model, case_dir)
    elif outcome.kind == "error" and case.op != "unpack-existing" and out.exists() and any(out.iterdir()):
        outcome = Outcome("bad", f"a failed unpack left files in {out.name}", outcome.what)
    outcome.detail = f"{desc}; {outcome.detail}"
    return outcome


# --------------------------------------------------------------------------- farm parts
def part_case(r: Runner, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
    from bundler.bundle_io import verify_bundle
    from bundler.merge import merge_parts
    from tests.test_merge import make_part

    bundle = r._copy_bundle(case.model, case_dir)
    part = make_part(case_dir / "part", bundle)
    doc = json.loads((part / "part.json").read_text())
    if case.target == "bundle":
        from tests.fuzzing import _bundle_file, mutate_file

        rel = _bundle_file(bundle, rng.choice(("manifest", "skeleton", "weights", "engine")))
        desc = f"bundle {rel}: {mutate_file(bundle / rel, case.mutation, rng)}"
    elif case.target == "part.json" and case.mutation in TYPE_MUTATIONS:
        desc = retype(part / "part.json", case.mutation)
    elif case.target == "part.json":
        text, desc = mutate_json(doc, case.mutation, rng)
        (part / "part.json").write_text(text)
    else:
        refs = [p for p in sorted(part.rglob("*")) if p.is_file() and p.name != "part.json"]
        path = rng.choice(refs)
        mutation = case.mutation.removesuffix("+repin")
        if mutation in TYPE_MUTATIONS:
            desc = retype(path, mutation)
        else:
            data, desc = mutate_bytes(path.read_bytes(), mutation, rng)
            path.write_bytes(data)
        rel = str(path.relative_to(part))
        if case.mutation.endswith("+repin"):
            from tests.fuzzing import _file_refs

            data = path.read_bytes()
            new = path.with_name(_sha(data) + path.suffix)  # files are named by their hash
            os.replace(path, new)
            for ref in _file_refs(doc):
                if ref.get("path") == rel:
                    ref["path"], ref["sha256"], ref["size"] = str(new.relative_to(part)), _sha(data), len(data)
            (part / "part.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
        desc = f"{rel}: {desc}"
    before = snapshot(bundle)
    out = {"merge-out": case_dir / "out", "merge-existing": case_dir / "precious"}.get(case.op)
    if case.op == "cli-merge":
        outcome = r.cli("merge", str(bundle), str(part))
    else:
        outcome = r.judge(lambda: merge_parts(bundle, [part], out=out))
    if outcome.kind == "error" and snapshot(bundle) != before:
        outcome = Outcome("bad", "a failed merge changed the bundle", outcome.what)
    elif outcome.kind == "ok":
        if case.op == "merge-existing":
            outcome = Outcome("bad", "merged into a directory that held files")
        else:
            merged = out or bundle
            problems = [p for p in verify_bundle(merged) if p.fatal]
            outcome = (
                Outcome("bad", f"the merged bundle fails verify: {problems[0]}")
                if problems
                else r.load(merged, case.model, case_dir)
            )
    outcome.detail = f"{desc}; {outcome.detail}"
    return outcome


# --------------------------------------------------------------------------- the test
def run_fuzz(
    corpus: Path, sandbox: Path, cases: int | None, seconds: float | None, run_known: bool
) -> list[dict[str, Any]]:
    sandbox.mkdir(parents=True, exist_ok=True)
    worker = Worker(corpus, sandbox, DEADLINE_S)
    rng = random.Random(SEED)
    results: list[dict[str, Any]] = []
    start = time.monotonic()

    def todo() -> Any:
        yield from systematic()
        i = 0
        while (cases is None or i < cases) and (seconds is None or time.monotonic() - start < seconds):
            i += 1
            yield random_case(rng, SEED * 1_000_003 + i)

    try:
        for case in todo():
            if case.key in KNOWN and not run_known:
                results.append({"key": case.key, "family": case.family, "kind": "known", "what": KNOWN[case.key]})
                continue
            t = time.monotonic()
            o = worker.run(case)
            results.append(
                {
                    "key": case.key,
                    "family": case.family,
                    "op": case.op,
                    "kind": o.kind,
                    "what": o.what,
                    "detail": o.detail,
                    "notes": o.notes,
                    "s": round(time.monotonic() - t, 3),
                }
            )
    finally:
        worker.stop()
    return results


def summarize(results: list[dict[str, Any]]) -> str:
    by = collections.Counter((r["family"], r["kind"]) for r in results)
    lines = [
        f"{len(results)} cases: "
        + ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(r["kind"] for r in results).items()))
    ]
    lines += [
        f"  {fam}: " + ", ".join(f"{k} {by[(fam, k)]}" for k in ("ok", "error", "bad", "known") if by[(fam, k)])
        for fam in sorted({f for f, _ in by})
    ]
    return "\n".join(lines)


@pytest.mark.skipif(os.name != "posix", reason="FIFOs, symlinks to /dev/zero and sparse files are POSIX")
def test_every_mutation_ends_in_a_clean_error_or_correct_output(corpus: Path, tmp_path: Path) -> None:
    cases, seconds = budget_from_env(CI_CASES)
    long_run = bool(os.environ.get("TRTX_FUZZ_BUDGET"))
    t = time.monotonic()
    results = run_fuzz(corpus, tmp_path / "sandbox", cases, seconds, run_known=long_run)
    report = os.environ.get("TRTX_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({"seconds": round(time.monotonic() - t, 1), "results": results}, indent=1))
    bad = [r for r in results if r["kind"] == "bad" or (r["key"].split("/")[3] == "none" and r["kind"] != "ok")]
    listing = "\n".join(f"{r['key']}: {r['what']} | {r['detail'][:300]}" for r in bad)
    assert not bad, f"{summarize(results)}\n{listing}"
