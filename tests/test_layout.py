"""The two distributions keep their shape: one version, the runtime's small dependency list, and a runtime that never
imports onnx, click or the bundler (checked in the source and in a process where those imports fail)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import runtime_shim

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

sys.path.insert(0, str(Path(__file__).parent))
import models

from bundler.build import build_bundle
from bundler.config import BuildOptions

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_PACKAGE = ROOT / "packages" / "trtx-runtime" / "runtime_shim"
FORBIDDEN = ("onnx", "click", "bundler")  # top-level import names the runtime must never import
RUNTIME_DEPENDENCIES = {"numpy", "zstandard", "filelock", "platformdirs", "blake3"}


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))["project"]


def test_one_version_for_both_distributions() -> None:
    runtime, bundler = (
        _project(ROOT / "packages" / "trtx-runtime" / "pyproject.toml"),
        _project(ROOT / "pyproject.toml"),
    )
    assert runtime["version"] == bundler["version"] == runtime_shim.__version__, (
        f"packages/trtx-runtime/pyproject.toml {runtime['version']}, pyproject.toml {bundler['version']}, "
        f"runtime_shim.__version__ {runtime_shim.__version__}: release both with one version"
    )
    pins = [
        Requirement(r)
        for r in bundler["dependencies"] + [r for extra in bundler["optional-dependencies"].values() for r in extra]
    ]
    pins = [r for r in pins if canonicalize_name(r.name) == "trtx-runtime"]
    assert pins, "the bundler must depend on trtx-runtime"
    for r in pins:
        assert str(r.specifier) == f"=={runtime['version']}", f"{r}: pin the runtime released with this bundler"


def test_runtime_requires_only_what_every_load_needs() -> None:
    runtime = _project(ROOT / "packages" / "trtx-runtime" / "pyproject.toml")
    assert runtime["name"] == "trtx-runtime"
    assert {canonicalize_name(Requirement(r).name) for r in runtime["dependencies"]} == RUNTIME_DEPENDENCIES
    assert {"trt", "nvcomp-cu13", "nvcomp-cu12", "onnxruntime"} <= set(runtime["optional-dependencies"])


def test_bundler_depends_on_the_runtime_with_trt_plus_onnx_and_click() -> None:
    deps = {canonicalize_name(r.name): r for r in map(Requirement, _project(ROOT / "pyproject.toml")["dependencies"])}
    assert {"trtx-runtime", "onnx", "click"} <= set(deps)
    assert deps["trtx-runtime"].extras == {"trt"}


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.+?)\n```", section, re.M)


def test_readme_setup_commands_install_both_distributions_and_ci_runs_the_test_command() -> None:
    demo, tests = _setup_commands()
    for command in (demo, tests):
        assert command.startswith("python3 -m pip install -e ./packages/trtx-runtime -e '.["), command
    assert demo.endswith("&& trtx-bundle demo") and tests.endswith("&& python3 -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert f"\n{tests} " in ci or f"\n{tests}\n" in ci, ".ci/run must run the README's test command word for word"
    for check in ("ruff check .", "ruff format --check .", "mypy"):
        assert check in ci


def _forbidden_imports(path: Path, root: Path = ROOT) -> list[str]:
    """Every import of a forbidden name in ``path``, at module level or inside functions, as 'file:line name'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (  # importlib.import_module("x") / __import__("x") with a literal name
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            names = [node.args[0].value]
        found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def test_runtime_source_never_imports_onnx_click_or_bundler() -> None:
    files = sorted(RUNTIME_PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = [hit for f in files for hit in _forbidden_imports(f)]
    assert not found, "the runtime must not import onnx, click or bundler:\n" + "\n".join(found)


def test_the_ast_check_sees_nested_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import onnx.helper\n    from click import echo\n    __import__('bundler.cli')\n")
    hits = _forbidden_imports(sample, root=tmp_path)
    assert [hit.split()[-1] for hit in hits] == ["onnx.helper", "click", "bundler.cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(RUNTIME_PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Runs in a fresh interpreter where importing onnx, click or bundler raises, as in an app that installed only the
# runtime: it imports every runtime_shim module (the GPU ones import their heavy libraries lazily), then loads the
# bundle and runs it.
CHILD = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import numpy as np

    FORBIDDEN = set(sys.argv[1].split(","))

    class Forbid:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"the runtime imported {name}, which an app with only trtx-runtime lacks")
            return None

    assert not FORBIDDEN & {m.split(".")[0] for m in sys.modules}, "already imported before the check"
    sys.meta_path.insert(0, Forbid())

    import runtime_shim
    names = ["runtime_shim"] + [m.name for m in pkgutil.walk_packages(runtime_shim.__path__, "runtime_shim.")]
    for name in names:
        importlib.import_module(name)

    bundle, cache, feeds_path, out_path = sys.argv[2:6]
    feeds = dict(np.load(feeds_path))
    with runtime_shim.load(bundle, app="LayoutCheck", cache_dir=cache) as session:
        outputs = session.run(feeds)
        backend = session.backend
    np.savez(out_path, **outputs)
    print(json.dumps({"modules": names, "backend": backend}))
    """
)


def test_runtime_imports_and_loads_without_onnx_click_or_bundler(tmp_path: Path) -> None:
    name, factory, profile = next(m for m in models.ALL_BUNDLABLE if m[0] == "external")
    onnx_path = factory(tmp_path)
    bundle = tmp_path / "bundle"
    build_bundle(
        onnx_path, bundle, options=BuildOptions(profiles=models.as_profiles(profile), weightful=False, weightless=False)
    )
    feeds = models.sample_inputs(name, profile, onnx_path)
    np.savez(tmp_path / "feeds.npz", **feeds)

    env = {k: v for k, v in os.environ.items() if k != "TRTX_CACHE_DIR"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, ",".join(FORBIDDEN), str(bundle), str(tmp_path / "cache"),
         str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")],
        cwd=tmp_path,  # not the checkout: only installed packages are importable
        env=env,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    missing = {_module_name(p) for p in RUNTIME_PACKAGE.rglob("*.py")} - set(result["modules"])
    assert not missing, f"not imported in the child (did a package fail to import?): {sorted(missing)}"

    if result["backend"] != "onnxruntime":  # a GPU that TRT-RTX supports: the import check above still ran
        pytest.skip(f"this machine loads with {result['backend']}; the fallback comparison runs elsewhere")
    original = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in original.get_outputs()], original.run(None, feeds)))
    got = np.load(tmp_path / "out.npz")
    assert sorted(got.files) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)


# A noqa comment names its codes and then says why, after " - " (e.g. E402 - why).
_NOQA = re.compile(r"#\s*noqa\b(?P<rest>[^#\n]*)", re.I)
_REASONED = re.compile(r"^:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*\s+-\s+\S")


def test_every_noqa_says_why() -> None:
    offenders: dict[str, list[str]] = {}
    for folder in ("packages/trtx-runtime/runtime_shim", "bundler", "tests", "bench", "templates"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                m = _NOQA.search(line)
                if m and not _REASONED.match(m.group("rest")):
                    offenders.setdefault(rel, []).append(f"{rel}:{n}: {line.strip()}")
    new = [hit for rel, hits in offenders.items() for hit in hits]
    assert not new, "say why after each noqa's codes (E402 - because ...):\n" + "\n".join(new)
