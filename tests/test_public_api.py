"""The runtime's public API is ``runtime_shim.__all__``, and the app template and the docs' code use nothing else."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import runtime_shim

ROOT = Path(__file__).resolve().parent.parent
# What apps copy from: the template app, and the code samples of the README and the docs.
APP_SOURCES = sorted((ROOT / "templates" / "app").glob("*.py"))
DOCS = [ROOT / "README.md", ROOT / "templates" / "app" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]*runtime_shim\.[^`\n]*)`")
PUBLIC = {*runtime_shim.__all__, "__all__"}


def runtime_names(code: str) -> set[str]:
    """Every name the code takes from runtime_shim: ``runtime_shim.X`` and ``from runtime_shim import X``, and
    ``runtime_shim.sub`` for any import of a submodule (``import runtime_shim.sub``, ``from runtime_shim.sub ...``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "runtime_shim":
            names.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "runtime_shim":
            if node.module == "runtime_shim":
                names.update(a.name for a in node.names)
            else:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("runtime_shim."))
    return names


def doc_code(path: Path) -> list[tuple[str, str]]:
    """(where, code) for each Python code block of a Markdown file, and each inline code span naming runtime_shim."""
    text = path.read_text(encoding="utf-8")
    out = [
        (f"{path.name} code block {i}", m.group(2))
        for i, m in enumerate(_FENCE.finditer(text))
        if m.group(1) in ("python", "py", "")
    ]
    if path.parent.name == "app":  # the template's README is read alongside app.py: its inline code counts too
        out += [(f"{path.name} `{m.group(1)}`", m.group(1)) for m in _INLINE.finditer(text)]
    return out


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:  # shell or JSON in an untagged block
        return False
    return True


def test_all_names_resolve_and_every_error_class_is_public() -> None:
    for name in runtime_shim.__all__:
        assert getattr(runtime_shim, name) is not None, name
    assert {"load", "Loader", "Session", "Report", "probe", "Machine", "clear_cache", "BundleError"} <= set(
        runtime_shim.__all__
    )
    assert {"apply_update", "DeltaError"} <= set(runtime_shim.__all__)
    error_classes = {
        n for n, v in vars(runtime_shim.errors).items() if isinstance(v, type) and issubclass(v, Exception)
    }
    assert error_classes <= set(runtime_shim.__all__), "every error class is public"


@pytest.mark.parametrize("path", APP_SOURCES, ids=lambda p: p.name)
def test_the_app_template_uses_only_the_public_api(path: Path) -> None:
    used = runtime_names(path.read_text(encoding="utf-8"))
    assert used, f"{path}: no use of runtime_shim found; the check is broken"
    assert used <= PUBLIC, f"{path}: uses {sorted(used - PUBLIC)}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_code_uses_only_the_public_api(path: Path) -> None:
    for where, code in doc_code(path):
        if not _parses(code):
            continue
        used = runtime_names(code)
        assert used <= PUBLIC, f"{where}: uses {sorted(used - PUBLIC)}"


def test_the_checker_sees_private_uses() -> None:
    code = "import runtime_shim\nfrom runtime_shim.session import plan\nruntime_shim.user_cache.UserCache('a')\n"
    assert runtime_names(code) == {"runtime_shim.session", "user_cache"}


def test_importing_the_api_stays_light() -> None:
    """``import runtime_shim`` and its error classes load neither numpy nor cuda-python nor TRT-RTX."""
    code = (
        "import sys, runtime_shim; runtime_shim.BundleError; runtime_shim.Report; runtime_shim.probe(); "
        "runtime_shim.clear_cache; "
        "print(sorted(n for n in ('numpy', 'cuda.bindings.driver', 'tensorrt_rtx', 'onnx', 'click') if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
