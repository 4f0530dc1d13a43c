"""The `trtx-bundle` group and what every command shares: error rendering, JSON and human output, logging.

Human output and progress go to stderr; `--json` output goes to stdout. Library errors (BundleError) become
`ERROR <message>` plus a hint and exit code 1 (2 for usage errors, as click does).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from runtime_shim.errors import BundleError

from .. import __version__

EXIT_ERROR = 1


def render_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into `ERROR ...` + hint on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BundleError as e:
            click.secho(f"ERROR {e}", fg="red", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            sys.exit(getattr(e, "exit_code", EXIT_ERROR))

    return wrapper


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def info(message: str) -> None:
    click.echo(message, err=True)


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        click.echo(prefix + record.getMessage(), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trtx-bundle")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (-vv: TRT-RTX's own log too).")
def main(verbose: int) -> None:
    """Package ONNX models for NVIDIA TensorRT for RTX.

    \b
    A bundle holds weightless engines per GPU architecture, one compressed weight store,
    pregenerated runtime caches and a manifest that pins every file by sha256.

    \b
    Typical flow:
      trtx-bundle build model.onnx -o bundle/ --shape input=1x3x224x224:4x3x224x224:16x3x224x224
      trtx-bundle verify bundle/
      trtx-bundle pack bundle/ -o model.trtx
      trtx-bundle doctor bundle/        # on the user's machine: what would run here, and why
    """
    handler = _StderrHandler()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("bundler", "runtime_shim"):
        logging.getLogger(name).setLevel(
            logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
        )


# =========================================================================== build side: build, inspect, verify, pack, unpack
