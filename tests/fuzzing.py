"""The fuzzer's library: mutations of bundle files, manifests, weight frames, archives and parts, and the judge.

A case is a small picklable description (family, target, mutation, operation, seed); Runner carries it out
in a worker process and returns an Outcome: "ok" (correct output), "error" (a clean BundleError, or one 'ERROR'
line and exit 1 from the CLI) or "bad" (anything else: a traceback, MemoryError, RecursionError, wrong outputs,
a hang, data lost, temp files left). The worker runs under an address-space limit, and every case under a
deadline: a case that does not answer in time is a hang, its worker is killed and another one started.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

SENTINEL = "@@FUZZ@@"  # a JSON string replaced by raw text after json.dumps (huge numbers, deep nesting)
BYTE_MUTATIONS = ("flip", "overwrite", "insert", "delete")
LENGTH_MUTATIONS = ("truncate", "extend", "empty")
TYPE_MUTATIONS = ("fifo", "directory", "symlink-dev-zero", "sparse-huge", "missing")
HUGE_FILE = 64 << 30  # sparse: no disk used; over the worker's address-space limit if anything reads it whole
WORKER_MEMORY = 6 << 30  # RLIMIT_AS of the worker: a read of a huge file ends in MemoryError, not the OOM killer


@dataclass(frozen=True)
class Case:
    """One fuzz case; ``key`` names it exactly (the seed fixes every random choice of the mutation)."""

    family: str  # file | manifest | frame | archive | part
    target: str  # which file, or which decoder
    mutation: str
    op: str  # what is run on the result
    seed: int = 0
    model: str = "mlp"

    @property
    def key(self) -> str:
        tail = "" if self.mutation in TYPE_MUTATIONS else f"#{self.seed}"
        return f"{self.model}/{self.family}/{self.target}/{self.mutation}/{self.op}{tail}"


@dataclass
class Outcome:
    kind: str  # ok | error | bad
    what: str = ""  # the error line, or what went wrong
    detail: str = ""  # the mutation as applied, and a traceback head for bad outcomes
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- byte, length and type mutations

_ONNXRUNTIME_OWN = re.compile(r"^(\.ses|mat-debug-\d+\.log)$")


def _onnxruntime_own(name: str) -> bool:
    """A file ONNX Runtime itself leaves in $TMPDIR (not this project's code): never counted as left behind."""
    return _ONNXRUNTIME_OWN.match(name) is not None


def mutate_bytes(
    data: bytes, mutation: str, rng: random.Random, lo: int = 0, hi: int | None = None
) -> tuple[bytes, str]:
    """``data`` changed in [lo, hi) by one mutation of BYTE_MUTATIONS or LENGTH_MUTATIONS; returns it and a description."""
    hi = len(data) if hi is None else hi
    pos = rng.randrange(lo, hi) if hi > lo else lo
    if mutation == "none":  # the control: an untouched input must give the right outputs through every operation
        return data, "unchanged"
    if not data and mutation in ("flip", "overwrite", "delete"):
        mutation = "extend"
    if mutation == "flip":
        bit = rng.randrange(8)
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :], f"bit {bit} of byte {pos} flipped"
    if mutation == "overwrite":
        n = rng.choice((1, 2, 4, 8, 16, 64))
        junk = rng.choice((b"\x00", b"\xff", None))
        new = junk * n if junk else rng.randbytes(n)
        return data[:pos] + new + data[pos + n :], f"{n} bytes at {pos} overwritten"
    if mutation == "insert":
        n = rng.choice((1, 3, 8, 512, 4096))
        return data[:pos] + rng.randbytes(n) + data[pos:], f"{n} bytes inserted at {pos}"
    if mutation == "delete":
        n = min(rng.choice((1, 3, 8, 512, 4096)), hi - pos)
        return data[:pos] + data[pos + n :], f"{n} bytes deleted at {pos}"
    if mutation == "truncate":
        return data[:pos], f"truncated to {pos} bytes"
    if mutation == "extend":
        n = rng.choice((1, 7, 512, 65536))
        tail = b"\0" * n if rng.random() < 0.5 else rng.randbytes(n)
        return data + tail, f"{n} bytes appended"
    if mutation == "empty":
        return b"", "emptied"
    raise ValueError(mutation)


def retype(path: Path, mutation: str) -> str:
    """Replace the file at ``path`` by something else of the same name (TYPE_MUTATIONS)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    if mutation == "fifo":
        os.mkfifo(path)
    elif mutation == "directory":
        path.mkdir()
        (path / "inside").write_bytes(b"x")
    elif mutation == "symlink-dev-zero":
        path.symlink_to("/dev/zero")
    elif mutation == "sparse-huge":
        with open(path, "wb") as f:
            f.truncate(HUGE_FILE)
    elif mutation != "missing":
        raise ValueError(mutation)
    return f"replaced by {mutation}"


# --------------------------------------------------------------------------- structural JSON mutations
def json_paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a parsed JSON document (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out.extend(json_paths(v, (*prefix, k)))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


JSON_MUTATIONS = (
    "delete",
    "null",
    "wrong-type",
    "huge-number",
    "negative",
    "deep-nesting",
    "duplicate-entry",
    "duplicate-key",
    "long-string",
    "float",
)
_WRONG: tuple[Any, ...] = ("a string", 7, 1.5, True, [], {}, [1, 2], {"k": "v"})


def mutate_json(doc: Any, mutation: str, rng: random.Random, prefer: str = "") -> tuple[str, str]:
    """A structural mutation of a parsed JSON document, as text (some are not expressible as Python values)."""
    paths = json_paths(doc)
    pool = [p for p in paths if prefer and str(p[0]) == prefer] or paths
    if mutation == "duplicate-entry":
        pool = [p for p in pool if isinstance(_get(doc, p), list) and _get(doc, p)] or pool
    path = rng.choice(pool)
    parent, key = _get(doc, path[:-1]), path[-1]
    where = ".".join(map(str, path))
    raw = ""
    if mutation == "delete":
        del parent[key]
    elif mutation == "null":
        parent[key] = None
    elif mutation == "wrong-type":
        parent[key] = rng.choice([w for w in _WRONG if type(w) is not type(parent[key])])
    elif mutation == "huge-number":
        parent[key], raw = SENTINEL, rng.choice(("9" * 5000, "1e400", "-1e400", str(1 << 64), "1" + "0" * 30))
    elif mutation == "negative":
        parent[key] = -rng.choice((1, 8, 1 << 31, 1 << 63))
    elif mutation == "deep-nesting":
        depth = rng.choice((200, 5000, 100_000))
        parent[key], raw = SENTINEL, "[" * depth + "]" * depth
    elif mutation == "duplicate-entry":
        value = _get(doc, path)
        if isinstance(value, list) and value:
            value.append(json.loads(json.dumps(rng.choice(value))))
        else:
            parent[key] = [value, value]
    elif mutation == "duplicate-key" and isinstance(parent, dict):
        # the key twice in its object, the decoy first or last (Python's json keeps the last, other parsers the first)
        pair = [json.dumps(parent[key]), rng.choice(('"decoy"', "null", "0", "[]"))]
        rng.shuffle(pair)
        parent[key], raw = SENTINEL, f"{pair[0]}, {json.dumps(key)}: {pair[1]}"
    elif mutation == "duplicate-key":
        parent[key] = [parent[key], parent[key]]
    elif mutation == "long-string":
        parent[key] = "x" * rng.choice((1 << 10, 1 << 20))
    elif mutation == "float":
        value = parent[key]
        parent[key] = float(value) + 0.5 if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.5
    else:
        raise ValueError(mutation)
    text = json.dumps(doc, indent=1, sort_keys=True)
    if raw:
        text = text.replace(f'"{SENTINEL}"', raw, 1)
    return text, f"{mutation} at {where}"


# --------------------------------------------------------------------------- the worker and its deadline
def _serve(conn: Connection, corpus: str, sandbox: str, deadline_s: float = 15.0) -> None:
    import faulthandler
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))  # as pytest has it: some test modules import their neighbours
    home, tmp = Path(sandbox) / "home", Path(sandbox) / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    for var, value in (("HOME", home), ("XDG_CACHE_HOME", home), ("TRTX_CACHE_DIR", home), ("TMPDIR", tmp)):
        os.environ[var] = str(value)  # nothing written outside the sandbox
    os.chdir(sandbox)
    tempfile.tempdir = str(tmp)
    runner = Runner(Path(corpus), Path(sandbox))
    with open(Path(sandbox) / "stacks.txt", "w") as stacks:
        while True:
            case = conn.recv()
            if case is None:
                return
            # where a hang hangs: every thread's stack, written just before the parent gives up on the case
            faulthandler.dump_traceback_later(deadline_s * 0.6, file=stacks)
            outcome = runner.run(case)
            faulthandler.cancel_dump_traceback_later()
            conn.send(outcome)


class Worker:
    """A process that runs cases one at a time; a case past its deadline counts as a hang and costs the worker."""

    def __init__(self, corpus: Path, sandbox: Path, deadline_s: float) -> None:
        self.corpus, self.sandbox, self.deadline_s = corpus, sandbox, deadline_s
        self._proc: Any = None
        self._conn: Connection | None = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # forking a process that holds ORT's threads is not safe
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve, args=(child, str(self.corpus), str(self.sandbox), self.deadline_s), daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent

    def run(self, case: Case, on_hang: Callable[[], None] | None = None) -> Outcome:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        assert self._conn is not None
        self._conn.send(case)
        try:
            if self._conn.poll(self.deadline_s):
                outcome: Outcome = self._conn.recv()
                return outcome
            what = f"no answer within {self.deadline_s:.0f} s (hang)"
        except (EOFError, OSError):
            what = f"the worker died (exit code {self._proc.exitcode})"
        self.stop(kill=True)
        if on_hang:
            on_hang()
        return Outcome("bad", what, _stack_head(self.sandbox / "stacks.txt"))

    def stop(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        if kill or self._conn is None:
            self._proc.kill()
        else:
            try:
                self._conn.send(None)
            except OSError:
                self._proc.kill()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = None


def _stack_head(path: Path) -> str:
    """The innermost frames of the main thread in the last dump faulthandler wrote, outside the fuzzer."""
    try:
        dump = path.read_text(errors="replace").split("Thread 0x")
    except OSError:
        return ""
    main = [d for d in dump if "most recent call first" in d and "(most recent call first)" in d]
    lines = [ln.strip() for ln in (main[-1] if main else "").splitlines() if ln.strip().startswith("File ")]
    ours = [ln for ln in lines if "/tests/" not in ln and "multiprocessing" not in ln]
    return "hung at: " + " <- ".join(ln.replace("File ", "").split("/")[-1] for ln in ours[:3])


def budget_from_env(default_cases: int) -> tuple[int | None, float | None]:
    """TRTX_FUZZ_BUDGET: '600s' (seconds of random cases) or '5000' (cases); unset: the CI default."""
    value = os.environ.get("TRTX_FUZZ_BUDGET", "").strip()
    if not value:
        return default_cases, None
    if value.endswith("s"):
        return None, float(value[:-1])
    return int(value), None


# --------------------------------------------------------------------------- carrying out one case (in the worker)
# A second model (or hundreds) beside the bundle's one: a valid twin, or one that breaks a rule between models.
MODEL_MUTATIONS = ("model-twin", "model-same-name", "model-no-tensors", "model-other-size", "models-300")
MANIFEST_EXTRAS = (
    *("tensor-other-blob", "shift-offset", "shift-offset+repin", "raw-size-2g", "blob-1t", "empty-index"),
    *MODEL_MUTATIONS,
)
TAR_MUTATIONS = (
    "member-fifo",
    "member-symlink",
    "member-hardlink",
    "member-dir",
    "member-chardev",
    "member-dotdot",
    "member-absolute",
    "member-duplicate",
    "member-rename",
    "member-size-lie",
)
KEEP_NAMES = {".bundle.merge.lock", "bundle", "cache", "precious", "out", "part", "archive.trtx", "x.npy", "outputs"}


def _traceback_head(e: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/tests/" not in f.filename and "/click/" not in f.filename] or frames
    where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in ours[-3:])
    return f"{type(e).__name__}: {str(e)[:200]} [at {where}]"


def snapshot(root: Path) -> dict[str, Any]:
    """What a directory holds (file bytes, link targets, other types by name), to tell whether it was touched."""
    out: dict[str, Any] = {}
    if not root.exists() and not root.is_symlink():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.stat().st_size if p.stat().st_size > (64 << 20) else p.read_bytes())
            else:
                out[rel] = ("dir" if p.is_dir() else "other",)
    return out


class Runner:
    """Carries out cases in the worker: copies the corpus into a fresh case folder, mutates, runs, judges."""

    def __init__(self, corpus: Path, sandbox: Path) -> None:
        import numpy as np

        from runtime_shim.machine import probe
        from runtime_shim.session import Loader

        self.corpus, self.sandbox, self.n = corpus, sandbox, 0
        for p in sandbox.glob("case-*"):  # what a killed worker's case left
            _remove(p)
        for p in (sandbox / "tmp").iterdir():
            _remove(p)
        no_gpu = _replace(probe(), gpus=())  # the ONNX Runtime fallback on every machine, GPU or not
        self.loader = Loader(probe=lambda: no_gpu)
        self.ref: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for ref in sorted(corpus.glob("*/ref.npz")):
            data = np.load(ref)
            ins = {k[3:]: data[k] for k in data.files if k.startswith("in.")}
            outs = {k[4:]: data[k] for k in data.files if k.startswith("out.")}
            self.ref[ref.parent.name] = ins, outs

    # ----------------------------------------------------------------- judging
    def judge(self, call: Callable[[], Any], model: str | None = None) -> Outcome:
        """A library call: a BundleError is a clean error; any other exception is bad; outputs must match."""
        from runtime_shim.errors import BundleError

        try:
            got = call()
        except BundleError as e:
            return Outcome("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        except BaseException as e:
            return Outcome("bad", f"{type(e).__name__} escaped", _traceback_head(e))
        return self.compare(got, model) if model else Outcome("ok")

    def compare(self, got: dict[str, Any], model: str) -> Outcome:
        import numpy as np

        want = self.ref[model][1]
        if set(got) != set(want):
            return Outcome("bad", f"wrong outputs: names {sorted(got)}, expected {sorted(want)}")
        for k, v in want.items():
            g = np.asarray(got[k])
            if g.shape != v.shape or g.dtype != v.dtype or not np.allclose(g, v, rtol=1e-4, atol=1e-5, equal_nan=True):
                return Outcome("bad", f"silently wrong output {k!r}")
        return Outcome("ok")

    def cli(self, *args: str) -> Outcome:
        """The real CLI in this process: exit 0, or exactly one 'ERROR' line and a non-zero exit, no traceback."""
        from click.testing import CliRunner

        from bundler.cli import main

        r = CliRunner().invoke(main, list(args))
        err = r.stderr
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            return Outcome("bad", f"{type(r.exception).__name__} escaped the CLI", _traceback_head(r.exception))
        if r.exit_code == 0:
            return Outcome("ok")
        errors = [line for line in err.splitlines() if line.startswith("ERROR ")]
        if r.exit_code == 2 and not errors:  # click's usage errors (documented in cli/app.py): one 'Error:' line
            errors = [line for line in err.splitlines() if line.startswith("Error: ")]
        if len(errors) != 1 or "Traceback" in err:
            return Outcome("bad", f"exit {r.exit_code} with {len(errors)} ERROR lines", err[-400:])
        what = errors[0][:300]
        if what.endswith("listed on stdout") and r.stdout.strip():  # verify: the problems themselves
            lines = r.stdout.strip().splitlines()
            what += " | " + next((ln for ln in lines if ln.startswith(" ")), lines[0]).strip()[:200]
        return Outcome("error", f"exit {r.exit_code}: {what}")

    # ----------------------------------------------------------------- operations on a bundle
    def load(self, bundle: Path, model: str, case_dir: Path, verify: str = "once", check: bool = True) -> Outcome:
        ins = self.ref[model][0]

        def call() -> dict[str, Any]:
            with self.loader.load(bundle, "Fuzz", cache_dir=case_dir / "cache", verify_weights=verify) as s:
                return s.run(ins)

        return self.judge(call, model if check else None)

    def bundle_op(self, op: str, bundle: Path, model: str, case_dir: Path, check: bool = True) -> Outcome:
        import numpy as np

        if op in ("load", "load-always", "load-warm"):
            return self.load(bundle, model, case_dir, "always" if op == "load-always" else "once", check)
        if op == "verify":
            outcome = self.cli("verify", str(bundle))
            if outcome.kind == "ok":  # verify said OK: then the bundle must load and give the right outputs
                loaded = self.load(bundle, model, case_dir, check=check)
                if loaded.kind == "error":
                    outcome.notes.append(f"verify OK, load refused: {loaded.what}")
                return loaded if loaded.kind == "bad" else outcome
            return outcome
        if op == "inspect":
            return self.cli("inspect", "--json", str(bundle))
        if op == "run":
            (name, x), *_ = self.ref[model][0].items()
            np.save(case_dir / "x.npy", x)
            out = case_dir / "outputs"
            outcome = self.cli(
                "run",
                str(bundle),
                "-i",
                f"{name}={case_dir / 'x.npy'}",
                "-o",
                str(out),
                "--cache-dir",
                str(case_dir / "cache"),
            )
            if outcome.kind == "ok" and check:
                return self.compare({p.stem: np.load(p) for p in out.glob("*.npy")}, model)
            return outcome
        raise ValueError(op)

    # ----------------------------------------------------------------- one case
    def run(self, case: Case) -> Outcome:

        self.n += 1
        case_dir = self.sandbox / f"case-{self.n}"
        case_dir.mkdir()
        (case_dir / "precious").mkdir()
        (case_dir / "precious" / "keep.txt").write_bytes(b"existing data that no case may destroy\n")
        rng = random.Random(case.seed)
        try:
            outcome = getattr(self, "_" + case.family)(case, case_dir, rng)
        except BaseException as e:
            outcome = Outcome("bad", f"fuzzer error {type(e).__name__}", _traceback_head(e))
        if (case_dir / "precious" / "keep.txt").read_bytes() != b"existing data that no case may destroy\n":
            outcome = Outcome("bad", "existing data destroyed", outcome.detail)
        left = sorted(p.name for p in case_dir.iterdir() if p.name not in KEEP_NAMES)
        # ONNX Runtime's own files, not ours: .ses, its session marker (its telemetry also writes ~/.cache/Microsoft),
        # and mat-debug-<pid>.log, which libonnxruntime 1.30 writes (seen on the lent GPU machine's image)
        left += sorted(f"$TMPDIR/{p.name}" for p in (self.sandbox / "tmp").iterdir() if not _onnxruntime_own(p.name))
        if left and outcome.kind != "bad":
            outcome = Outcome("bad", f"left behind: {left}", outcome.detail)
        for p in [case_dir, *(p for p in (self.sandbox / "tmp").iterdir() if not _onnxruntime_own(p.name))]:
            _remove(p)
        return outcome

    def _copy_bundle(self, model: str, case_dir: Path) -> Path:
        import shutil

        return Path(shutil.copytree(self.corpus / model / "bundle", case_dir / "bundle", symlinks=True))

    def _file(self, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
        bundle = self._copy_bundle(case.model, case_dir)
        if case.op == "load-warm" or case.target == "cache":  # the user ran the pristine bundle once: cache filled
            warm = self.load(bundle, case.model, case_dir)
            if warm.kind != "ok":
                return Outcome("bad", f"the pristine bundle did not load: {warm.what}", warm.detail)
        if case.target == "cache":  # what the shim keeps for this user, damaged between two loads
            kept = sorted(p for p in (case_dir / "cache").rglob("*") if p.is_file() and "locks" not in p.parts)
            if not kept:
                return Outcome("ok", "nothing kept in the user cache", "")
            path = rng.choice(kept)
            rel = str(path.relative_to(case_dir))
            desc = mutate_file(path, case.mutation, rng)
            outcome = self.load(bundle, case.model, case_dir)
            outcome.detail = f"{rel}: {desc}; {outcome.detail}"
            return outcome
        rel = _bundle_file(bundle, case.target)
        desc = mutate_file(bundle / rel, case.mutation.removesuffix("+repin"), rng)
        check = True
        if case.mutation.endswith("+repin"):
            rel = repin(bundle, rel)
            check = case.target != "skeleton"  # a re-pinned skeleton is another model: any output is its own
        outcome = self.after_op(case, bundle, case_dir, check)
        outcome.detail = f"{rel}: {desc}; {outcome.detail}"
        return outcome

    def after_op(self, case: Case, bundle: Path, case_dir: Path, check: bool = True) -> Outcome:
        """The case's operation on the mutated bundle; "load-then-pristine": then the pristine bundle, same cache."""
        if case.op != "load-then-pristine":
            return self.bundle_op(case.op, bundle, case.model, case_dir, check)
        first = self.load(bundle, case.model, case_dir, check=check)
        if first.kind == "bad":
            return first
        pristine = self.corpus / case.model / "bundle"
        second = self.load(pristine, case.model, case_dir)
        if second.kind != "ok":
            return Outcome("bad", f"the pristine bundle, loaded after the damaged one: {second.what}", second.detail)
        return first

    def _manifest(self, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
        bundle = self._copy_bundle(case.model, case_dir)
        doc = json.loads((bundle / "manifest.json").read_text())
        if case.mutation in MANIFEST_EXTRAS:
            text, desc = mutate_index(bundle, doc, case.mutation, rng)
        else:
            text, desc = mutate_json(doc, case.mutation, rng, prefer=case.target)
        (bundle / "manifest.json").write_text(text)
        outcome = self.after_op(case, bundle, case_dir)
        outcome.detail = f"manifest.json: {desc}; {outcome.detail}"
        return outcome

    def _frame(self, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
        from tests import test_fuzz

        return test_fuzz.frame_case(self, case, case_dir, rng)

    def _archive(self, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
        from tests import test_fuzz

        return test_fuzz.archive_case(self, case, case_dir, rng)

    def _part(self, case: Case, case_dir: Path, rng: random.Random) -> Outcome:
        from tests import test_fuzz

        return test_fuzz.part_case(self, case, case_dir, rng)


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _remove(p: Path) -> None:
    import shutil

    if p.is_symlink() or p.is_file() or (p.exists() and not p.is_dir()):
        p.unlink()
    elif p.is_dir():
        for dirpath, dirnames, _ in os.walk(p):  # a case may leave read-only folders behind
            for d in dirnames:
                full = Path(dirpath) / d
                if not full.is_symlink():
                    os.chmod(full, 0o755)
        shutil.rmtree(p, ignore_errors=True)
    elif not p.exists():
        return


def _bundle_file(bundle: Path, target: str) -> str:
    if target == "manifest":
        return "manifest.json"
    folder = {"skeleton": "skeleton", "weights": "weights", "engine": "engines"}[target]
    (path,) = sorted((bundle / folder).iterdir())
    return f"{folder}/{path.name}"


def mutate_file(path: Path, mutation: str, rng: random.Random) -> str:
    if mutation in TYPE_MUTATIONS:
        return retype(path, mutation)
    if mutation == "mmap-flip":  # changed through a shared mapping, size and mtime as they were
        import mmap

        st = path.stat()
        if not st.st_size:
            return "empty file left as it is"
        pos = rng.randrange(st.st_size)
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[pos] ^= 1 << rng.randrange(8)
            m.flush()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return f"a bit of byte {pos} flipped through mmap, mtime kept"
    data, desc = mutate_bytes(path.read_bytes(), mutation, rng)
    path.write_bytes(data)
    return desc


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def repin(bundle: Path, rel: str) -> str:
    """Make the manifest pin the file at ``rel`` as it now is, renamed to its new hash as the format names files."""
    doc = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / rel).read_bytes()
    folder, name = rel.split("/", 1)
    new = f"{folder}/{_sha(data)}{Path(name).suffix}"
    os.replace(bundle / rel, bundle / new)
    for ref in _file_refs(doc):
        if ref.get("path") == rel:
            ref["path"], ref["sha256"], ref["size"] = new, _sha(data), len(data)
    (bundle / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    return new


def _file_refs(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, dict):
        found = [obj] if {"path", "sha256", "size"} <= set(obj) else []
        return found + [r for v in obj.values() for r in _file_refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _file_refs(v)]
    return []


def _frame_digest(doc: Any, stored: bytes) -> str:
    from runtime_shim.store.digest import digest_function

    return digest_function(doc["weights"].get("frame_digest", "sha256"))(stored)


def mutate_index(bundle: Path, doc: Any, mutation: str, rng: random.Random) -> tuple[str, str]:
    """Mutations of the weight index that keep it well-typed: the consistency checks must catch them."""
    w = doc["weights"]
    blobs, tensors = w["blobs"], doc["models"][0]["tensors"]
    if mutation == "tensor-other-blob":
        t = rng.choice(tensors)
        t["blob"] = rng.choice([i for i in range(len(blobs)) if i != t["blob"]] or [t["blob"] + 1])
        desc = f"tensor {t['name']} pointed at blob {t['blob']}"
    elif mutation.startswith("shift-offset"):
        b = rng.choice(blobs)
        f = rng.choice(b["frames"])
        f["offset"] += rng.choice((-64, -8, -1, 1, 8, 64, 1 << 40))
        desc = f"a frame's offset moved to {f['offset']}"
        if mutation.endswith("+repin"):  # the frame hash names the bytes now read: only the index can tell
            data = (bundle / w["file"]["path"]).read_bytes()
            if 0 <= f["offset"] and f["offset"] + f["size"] <= len(data):
                f["digest"] = _frame_digest(doc, data[f["offset"] : f["offset"] + f["size"]])
                desc += " (frame hash re-pinned)"
    elif mutation == "raw-size-2g":
        w["raw_size"], desc = 2 << 30, "raw_size 2 GiB"
    elif mutation == "blob-1t":
        b = rng.choice(blobs)
        b["nbytes"] = 1 << 40
        b["frames"][-1]["raw_size"] += (1 << 40) - sum(f["raw_size"] for f in b["frames"])
        desc = "a blob of 1 TiB"
    elif mutation == "empty-index":
        w["blobs"], doc["models"][0]["tensors"], w["raw_size"], desc = [], [], 0, "no blobs, no tensors"
    elif mutation in MODEL_MUTATIONS:
        desc = _mutate_models(doc["models"], mutation, rng)
    else:
        raise ValueError(mutation)
    return json.dumps(doc, indent=1, sort_keys=True), desc


def _mutate_models(ms: list[Any], mutation: str, rng: random.Random) -> str:
    """Copies of the first model added beside it (a deep copy each: JSON text), changed as ``mutation`` says."""
    n = 300 if mutation == "models-300" else 1  # thousands: tests/test_multi_inspect.py
    twins = [json.loads(json.dumps(ms[0])) for _ in range(n)]
    for i, t in enumerate(twins):
        t["name"] = ms[0]["name"] if mutation == "model-same-name" else f"twin{i}"
    if mutation == "model-no-tensors":  # its skeleton still refers to every tensor
        twins[0]["tensors"] = []
    if mutation == "model-other-size":  # one skeleton pinned with two sizes
        twins[0]["skeleton"]["file"]["size"] += rng.choice((-1, 1, 1 << 40))
    at = rng.choice((0, len(ms)))  # before or after the bundle's own model
    ms[at:at] = twins
    return f"{mutation}: {n} model(s) added"
