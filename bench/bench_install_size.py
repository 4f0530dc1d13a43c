"""Installed size of what an app embeds: the runtime alone and with each extra, next to the single distribution of
before the split (commit 139892a), and the bundler with all its dependencies.

Each row is a `pip install --target DIR` into a fresh folder (pip's download cache is used), measured with `du -sb`
(apparent bytes). Sizes are for this machine's platform and Python; the TRT-RTX and ONNX Runtime wheels dominate.

    python bench/bench_install_size.py [--old-commit 139892a] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_bytes(folder: Path) -> int:
    """Apparent size of ``folder`` as `du -sb` reports it (files and directories); Python's own sum without du."""
    if shutil.which("du"):
        out = subprocess.run(["du", "-sb", str(folder)], check=True, capture_output=True, text=True).stdout
        return int(out.split()[0])
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def largest(folder: Path, n: int = 3) -> str:
    """The ``n`` largest top-level entries of an install folder, e.g. 'tensorrt_rtx_libs 210 MB, ...'."""
    sizes = sorted((installed_bytes(p), p.name) for p in folder.iterdir() if not p.name.endswith(".dist-info"))
    return ", ".join(f"{name} {size / 1e6:.0f} MB" for size, name in reversed(sizes[-n:]))


def pip_install(folder: Path, specs: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    proc = subprocess.run([*cmd, "--target", str(folder), *specs], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pip install {' '.join(specs)} failed:\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-commit", default="139892a", help="the single-distribution commit to compare with")
    ap.add_argument("--keep", type=Path, help="install into this folder (kept) instead of a temporary one")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="install-size-"))
    work.mkdir(parents=True, exist_ok=True)
    old = work / "old-checkout"
    if not old.exists():
        git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old_commit]
        subprocess.run(git, check=True, stdout=sys.stderr)  # stdout is the table
    runtime = str(ROOT / "packages" / "trtx-runtime")
    rows = [
        ("(a) before: trtx-bundler " + args.old_commit + " (one distribution)", [str(old)]),
        ("(b) trtx-runtime", [runtime]),
        ("(c) trtx-runtime[trt]", [f"{runtime}[trt]"]),
        ("(d) trtx-runtime[onnxruntime]", [f"{runtime}[onnxruntime]"]),
        ("(e) trtx-bundler (with trtx-runtime[trt])", [runtime, str(ROOT)]),
        # An app that also ships the CPU fallback, before and after.
        ("(f) before, with its [onnxruntime] extra", [f"{old}[onnxruntime]"]),
        ("(g) trtx-runtime[trt,onnxruntime]", [f"{runtime}[trt,onnxruntime]"]),
    ]
    results = []
    own = 0
    try:
        for i, (label, specs) in enumerate(rows):
            target = work / f"site-{i}"
            shutil.rmtree(target, ignore_errors=True)
            pip_install(target, specs)
            results.append((label, installed_bytes(target), largest(target)))
            if label.startswith("(b)"):
                own = installed_bytes(target / "runtime_shim")
            print(f"measured {label}", file=sys.stderr)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    base = results[0][1]
    print(f"Python {sys.version.split()[0]} on {sys.platform}; pip install --target, du -sb")
    print(f"{'install':<52} {'MB':>9} {'vs (a)':>7}  largest parts")
    for label, size, parts in results:
        print(f"{label:<52} {size / 1e6:9.1f} {size / base:7.3f}  {parts}")
    print(f"the runtime_shim package itself, in (b): {own / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
