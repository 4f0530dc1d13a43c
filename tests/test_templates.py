"""The CI templates cannot rot: every `trtx-bundle` command they run exists, with every flag they pass, and linters pass.

Each template is parsed as YAML; every shell string in it (GitHub `run:` steps, GitLab `script:` lines) is
searched for `trtx-bundle ...` commands; each command's `--help` must work and each flag must be one of its options.
actionlint checks the GitHub workflow (with the farm's runner labels from templates/actionlint.yaml) and
check-jsonschema the GitLab pipeline against GitLab's own schema; both run offline and any finding fails.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from bundler.cli import main
from bundler.config_file import load_config
from bundler.farm import farm_settings

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
CI_TEMPLATES = ["github-actions.yml", "gitlab-ci.yml"]
PIPELINE = {"build", "verify", "farm-job", "merge", "inspect", "pack"}  # what the issue asks each template to run


SHELL_KEYS = {"run", "script", "before_script", "after_script"}  # where GitHub and GitLab keep shell commands


def _shell_strings(node: Any, shell: bool = False) -> Iterator[str]:
    if isinstance(node, str):
        if shell:
            yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _shell_strings(v, shell or k in SHELL_KEYS)
    elif isinstance(node, list):
        for v in node:
            yield from _shell_strings(v, shell)


def commands(path: Path) -> list[list[str]]:
    """Every `trtx-bundle` command line in the template, split like a shell would (continuations joined)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [argv for text in _shell_strings(doc) for argv in commands_in(text)]


def commands_in(text: str) -> list[list[str]]:
    """The `trtx-bundle` command lines of one shell string."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True) if "trtx-bundle" in line else []
        for i, word in enumerate(words):
            if word == "trtx-bundle" and (i == 0 or words[i - 1] in ("&&", "||", ";", "|")):
                end = next((j for j in range(i + 1, len(words)) if words[j] in ("&&", "||", ";", "|")), len(words))
                out.append(words[i + 1 : end])
    return out


def split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(global options, subcommand, the subcommand's words)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1
    return argv[:i], argv[i], argv[i + 1 :]


def option_names(command: click.Command) -> set[str]:
    names = {"--help", "-h"}
    for p in command.params:
        if isinstance(p, click.Option):
            names.update(p.opts + p.secondary_opts)
    return names


@pytest.mark.parametrize("template", CI_TEMPLATES)
def test_every_command_and_flag_exists(template: str) -> None:
    cmds = commands(TEMPLATES / template)
    assert cmds, f"{template}: no trtx-bundle command found; the extraction is broken"
    used = set()
    for argv in cmds:
        global_opts, sub, words = split(argv)
        where = f"{template}: `trtx-bundle {' '.join(argv)}`"
        assert sub in main.commands, f"{where}: no command {sub!r} (have: {', '.join(sorted(main.commands))})"
        res = CliRunner().invoke(main, [*global_opts, sub, "--help"])
        assert res.exit_code == 0, f"{where}: --help failed: {res.output}"
        known = option_names(main.commands[sub])
        for w in words:
            if w.startswith("-") and w != "-":
                flag = w.split("=", 1)[0]
                assert flag in known, f"{where}: {sub} has no option {flag} (it has {', '.join(sorted(known))})"
        for g in global_opts:
            assert g.split("=", 1)[0] in option_names(main), f"{where}: no global option {g}"
        used.add(sub)
    assert PIPELINE <= used, f"{template}: the pipeline should run {sorted(PIPELINE - used)} too"


@pytest.mark.parametrize("template", CI_TEMPLATES)
def test_the_merge_job_signs_keyless_after_merging_and_before_packing(template: str) -> None:
    """Issue 14: the merged bundle is signed where the CI hands out an identity token, then verified and packed."""
    doc = yaml.safe_load((TEMPLATES / template).read_text(encoding="utf-8"))
    if template == "github-actions.yml":
        job = doc["jobs"]["merge"]
        assert job["permissions"]["id-token"] == "write", "the OIDC token keyless signing needs"
        lines = [step["run"] for step in job["steps"] if "run" in step]
    else:
        job = doc["publish"]
        assert job["id_tokens"]["SIGSTORE_ID_TOKEN"]["aud"] == "sigstore", "the OIDC token keyless signing needs"
        lines = job["script"]
    subcommands = [split(cmd)[1:] for line in lines for cmd in commands_in(line)]
    order = [sub for sub, _ in subcommands]
    assert ["sign", ["bundle", "--keyless"]] in [[sub, words] for sub, words in subcommands], order
    assert order.index("merge") < order.index("sign") < order.index("verify") < order.index("pack"), order
    assert any("trtx-runtime[signing]" in line for line in lines if "pip install" in line), "model-signing installed"


def test_extraction_sees_flags_and_continuations(tmp_path: Path) -> None:
    """The extractor itself: a continued line and a chained command are read whole; names are not commands."""
    path = tmp_path / "ci.yml"
    path.write_text(
        "name: trtx-bundle\na:\n  run: |\n    trtx-bundle -v farm-job b -o p \\\n      --rounds 2 && trtx-bundle merge b p\n"
    )
    cmds = commands(path)
    assert cmds == [["-v", "farm-job", "b", "-o", "p", "--rounds", "2"], ["merge", "b", "p"]]


def _github_targets() -> set[str]:
    doc = yaml.safe_load((TEMPLATES / "github-actions.yml").read_text())
    return set(doc["jobs"]["farm"]["strategy"]["matrix"]["target"])


def _gitlab_targets() -> set[str]:
    doc = yaml.safe_load((TEMPLATES / "gitlab-ci.yml").read_text())
    return {
        t
        for job in doc.values()
        if isinstance(job, dict) and "parallel" in job
        for entry in job["parallel"]["matrix"]
        for t in entry["TARGET"]
    }


def test_farm_targets_match_bundle_toml() -> None:
    config = load_config(TEMPLATES / "bundle.toml")
    settings = farm_settings(config.farm, source="templates/bundle.toml")
    assert settings.targets, "templates/bundle.toml: [farm].targets is empty"
    assert _github_targets() == set(settings.targets) == _gitlab_targets()
    assert all(w.keys() <= {"input"} for w in settings.warmup)  # the inputs the example's [[profiles]] name


def _linter(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it comes with the test extra: pip install -e '.[test]')")
    return path


def test_github_template_passes_actionlint() -> None:
    """Deprecated action runtimes, unknown runner labels, bad expressions: any finding fails."""
    # shellcheck and pyflakes are off: actionlint runs them only where they are installed, and a test must
    # give the same verdict on every machine.
    result = subprocess.run(
        [
            _linter("actionlint"),
            "-no-color",
            "-shellcheck=",
            "-pyflakes=",
            "-config-file",
            "actionlint.yaml",
            "github-actions.yml",
        ],
        cwd=TEMPLATES,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"actionlint findings:\n{result.stdout}{result.stderr}"


def test_gitlab_template_passes_the_gitlab_schema() -> None:
    result = subprocess.run(
        [_linter("check-jsonschema"), "--builtin-schema", "vendor.gitlab-ci", "gitlab-ci.yml"],
        cwd=TEMPLATES,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"check-jsonschema findings:\n{result.stdout}{result.stderr}"


def test_actionlint_knows_the_farm_runner_labels() -> None:
    labels = yaml.safe_load((TEMPLATES / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    assert set(labels) == _github_targets()
