"""The `trtx-bundle` group and what every command shares: output streams, -v/-q, exit codes, error rendering.

Results (inspect, verify, doctor, build's summary, run's report, merge and farm-job results) go to stdout, so
``trtx-bundle inspect b > info.txt`` keeps them; progress, notes and diagnostics go to stderr; ``--json``
prints only JSON on stdout. Library errors (BundleError) become ``ERROR <message>`` plus a hint on stderr and
exit code 1 (2 for usage errors, as click does). Every command takes -v/-q, before or after its name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import click

from runtime_shim.errors import BundleError
from runtime_shim.fsutil import os_error_hint, os_error_path

from .. import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "error: a message (ERROR ...) and a hint on stderr",
    EXIT_USAGE: "usage error (unknown option, bad argument)",
}


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
        except OSError as e:
            # A file operation the library does not wrap (a full or read-only disk where the output goes, say):
            # still one line naming the file. The traceback stays available with -vv, for a bug report.
            logging.getLogger(__name__).debug("OSError in %s", fn.__name__, exc_info=True)
            where = os_error_path(e)
            click.secho(f"ERROR {where + ': ' if where else ''}{e.strerror or e}", fg="red", err=True)
            click.echo(f"hint: {os_error_hint(e) or 'check the path and run it again'}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def result(message: str) -> None:
    """A human-readable result: stdout (what a user redirects to a file)."""
    click.echo(message)


def info(message: str) -> None:
    """Progress and notes: stderr, silenced by -q (unless -v is given too)."""
    meta = _verbosity()
    if not meta.get("quiet") or meta.get("verbose"):
        click.echo(message, err=True)


def _verbosity() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().meta if ctx is not None else {}


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: "}.get(record.levelno, "")
        click.echo(prefix + record.getMessage(), err=True)


def _apply_logging(meta: Mapping[str, Any]) -> None:
    # -q silences progress and notes (info()), never warnings or errors; -v wins over -q where both are given.
    verbose = meta.get("verbose", 0)
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    for name in ("bundler", "runtime_shim"):
        logging.getLogger(name).setLevel(level)


def _count_verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """-v and -q given anywhere (before or after the command name) add up in the root context's meta."""
    if value:
        meta = ctx.find_root().meta
        if param.name == "verbose":
            meta["verbose"] = meta.get("verbose", 0) + int(value)
        else:
            meta["quiet"] = True
        _apply_logging(meta)
    return value


def verbosity_options() -> list[click.Option]:
    return [
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            callback=_count_verbosity,
            help="More detail on stderr (-vv: TRT-RTX's own log too); before or after the command name.",
        ),
        click.Option(
            ["-q", "--quiet"],
            is_flag=True,
            expose_value=False,
            callback=_count_verbosity,
            help="Only warnings and errors on stderr (results and --json output are unchanged).",
        ),
    ]


class Command(click.Command):
    """Every trtx-bundle command: takes -v/-q and lists its exit codes at the end of --help."""

    def __init__(self, *args: Any, exit_codes: Mapping[int, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params += verbosity_options()
        self.exit_codes = {**EXIT_CODES, **(exit_codes or {})}

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        with formatter.section("Exit codes"):
            formatter.write_dl([(str(code), words) for code, words in sorted(self.exit_codes.items())])


class Group(click.Group):
    command_class = Command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="trtx-bundle")
@click.option(
    "-v",
    "--verbose",
    count=True,
    expose_value=False,
    callback=_count_verbosity,
    help="More detail on stderr (-vv: TRT-RTX's own log too).",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    expose_value=False,
    callback=_count_verbosity,
    help="Only warnings and errors on stderr.",
)
def main() -> None:
    """Package ONNX models for NVIDIA TensorRT for RTX.

    \b
    A bundle holds one or more models: weightless engines per GPU architecture, one compressed
    weight store shared by its models, pregenerated runtime caches and a manifest that pins
    every file by sha256 (and a signature over it).

    \b
    Typical flow:
      trtx-bundle build model.onnx -o bundle/ --shape input=1x3x224x224:4x3x224x224:16x3x224x224
      trtx-bundle build det.onnx rec.onnx -o ocr/   # several models, MODEL.INPUT in --shape
      trtx-bundle farm-job bundle/ -o part/ ; trtx-bundle merge bundle/ part/   # on GPU runners
      trtx-bundle sign bundle/ --key private.pem ; trtx-bundle verify bundle/ --key public.pem
      trtx-bundle pack bundle/ -o model.trtx
      trtx-bundle doctor model.trtx     # on the user's machine: what would run here, and why
      trtx-bundle diff old/ new/ -o update.trtxd ; trtx-bundle apply bundle/ update.trtxd

    \b
    Results go to stdout, progress and diagnostics to stderr; --json prints JSON only.
    -v/-q work before or after the command name. Commands that read a bundle take its
    directory or its .trtx archive. Exit codes: 0 ok, 1 error, 2 usage error (farm-job: 3 unservable).
    """
    handler = _StderrHandler()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    _apply_logging(_verbosity())


def report_lines(r: Any) -> list[str]:
    """A load report (runtime_shim.report.Report) for people: run's and demo's result.

    Unlike Report.lines(): no runtime-cache line for ONNX Runtime (it has none), and timings named without
    their '_s' key suffix, in the unit printed.
    """
    out = [f"bundle {r.bundle} (model {r.model})", f"backend: {r.backend or 'none'}"]
    if r.gpu:
        g = r.gpu
        out.append(f"GPU {g['index']}: {g['name']} (SM {g['sm_text']}, device 0x{g['pci_device_id']:04x})")
    if r.why_not_trt:
        out.append(f"TensorRT for RTX not used: {r.why_not_trt}")
    if r.engine:
        out.append(f"engine: {r.engine.get('kind')} {r.engine.get('file', '')}")
    if r.backend == "tensorrt_rtx":
        out.append(f"runtime cache: {r.runtime_cache or 'none (kernels compiled on first use)'}")
    out += [f"warning: {w}" for w in r.warnings]
    if r.timings:
        names = {k: k[:-2] if k.endswith("_s") else k for k in r.timings}
        out.append("timings: " + ", ".join(f"{names[k]} {v * 1000:.1f} ms" for k, v in r.timings.items()))
    return out


class StderrProgress:
    """Progress for the build: a step that runs past a second is announced on stderr, then closed with its time."""

    DELAY = 1.0

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._lock = threading.Lock()
        self._shown: set[str] = set()
        self._last_advance = 0.0

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        t0 = time.monotonic()
        timer = threading.Timer(self.DELAY, self._announce, (label,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            with self._lock:
                shown = label in self._shown
                self._shown.discard(label)
            if shown and not self.quiet:
                info(f"  {label}: done in {time.monotonic() - t0:.1f} s")

    def _announce(self, label: str) -> None:
        with self._lock:
            self._shown.add(label)
        if not self.quiet:
            info(f"  {label} ...")

    def note(self, message: str) -> None:
        info(message)

    def advance(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            if label not in self._shown or now - self._last_advance < self.DELAY or not total:
                return
            self._last_advance = now
        if not self.quiet:
            info(f"  {label}: {100 * done // total}% of {mib(total)}")


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"
