"""The release workflow template cannot rot: current actions, real paths, publishing only on a tag, actionlint-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "templates" / "release-wheels.yml"

# The oldest major of each action that runs on node24 (node20 majors are deprecated on GitHub's runners), or, for
# actions that are not JavaScript (composite, Docker), the major that this template was written against.
MIN_MAJOR = {
    "actions/checkout": 6,
    "actions/setup-python": 6,
    "actions/upload-artifact": 7,
    "actions/download-artifact": 8,
    "pypa/cibuildwheel": 4,
}


def _workflow() -> dict[str, Any]:
    data = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def _steps(workflow: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, step) for name, job in workflow["jobs"].items() for step in job["steps"]]


def test_actions_are_current_majors() -> None:
    used = [step["uses"] for _job, step in _steps(_workflow()) if "uses" in step]
    assert used, "no actions found"
    for ref in used:
        action, _, version = ref.partition("@")
        if action == "pypa/gh-action-pypi-publish":
            assert version == "release/v1", ref  # PyPA's documented moving ref (a Docker action)
            continue
        assert action in MIN_MAJOR, f"{ref}: add it to MIN_MAJOR with its node24 major"
        major = int(version.lstrip("v").split(".")[0])
        assert major >= MIN_MAJOR[action], f"{ref}: use v{MIN_MAJOR[action]} or later (node20 majors are deprecated)"


def test_runtime_wheels_are_built_by_cibuildwheel_on_linux_and_windows() -> None:
    job = _workflow()["jobs"]["runtime-wheels"]
    assert set(job["strategy"]["matrix"]["os"]) >= {"ubuntu-latest", "windows-latest"}
    (cibw,) = [s for s in job["steps"] if s.get("uses", "").startswith("pypa/cibuildwheel@")]
    package_dir = ROOT / cibw["with"]["package-dir"]
    config = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["project"]["name"] == "trtx-runtime"
    cibw_config = config["tool"]["cibuildwheel"]
    assert "_planes" in cibw_config["test-command"], "each wheel must prove it carries the compiled helper"
    assert cibw_config["environment"]["TRTX_REQUIRE_NATIVE"] == "1", "a failed helper build must fail the wheel"
    assert {"linux", "windows"} <= set(config["tool"]["cibuildwheel"])


def test_sdists_of_both_distributions_are_built_from_real_paths() -> None:
    runs = [s["run"] for s in _workflow()["jobs"]["sdists-and-bundler"]["steps"] if "run" in s]
    builds = [r.split() for r in runs if r.startswith("python -m build")]
    assert [b[-1] for b in builds] == ["packages/trtx-runtime", "."]
    for build in builds:
        assert (ROOT / build[-1] / "pyproject.toml").is_file()


def test_publishes_only_on_a_tag_with_trusted_publishing() -> None:
    workflow = _workflow()
    assert workflow["permissions"] == {"contents": "read"}
    job = workflow["jobs"]["publish"]
    assert job["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert set(job["needs"]) == {"runtime-wheels", "sdists-and-bundler"}
    assert job["permissions"] == {"id-token": "write"}
    assert job["steps"][-1]["uses"].startswith("pypa/gh-action-pypi-publish@")
    assert "password" not in job["steps"][-1].get("with", {}), "trusted publishing needs no token"


def test_actionlint() -> None:
    """Deprecated action runtimes, bad expressions, unknown inputs: any finding fails."""
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (it comes with the test extra: pip install -e '.[test]')")
    # shellcheck and pyflakes are off: actionlint runs them only where they are installed, and a test must give the
    # same verdict on every machine.
    result = subprocess.run(
        [exe, "-no-color", "-shellcheck=", "-pyflakes=", TEMPLATE.name],
        cwd=TEMPLATE.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"actionlint findings:\n{result.stdout}{result.stderr}"
