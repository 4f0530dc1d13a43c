"""Shared pytest fixtures: the real silero-vad ONNX models, fetched once into pytest's cache."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SILERO_VERSION = "6.2.3"
_SILERO_PREFIX = "silero_vad/data/"


def _fetch_silero(cache: Path) -> dict[str, Path]:
    models_dir = cache / "models"
    done = cache / "COMPLETE"
    if not done.exists():
        wheels = sorted(cache.glob(f"silero_vad-{SILERO_VERSION}-*.whl"))
        if not wheels:
            # The package itself is only a carrier for the .onnx files: no deps, no install.
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 f"silero-vad=={SILERO_VERSION}", "-d", str(cache)],
                capture_output=True, text=True,
            )
            wheels = sorted(cache.glob(f"silero_vad-{SILERO_VERSION}-*.whl"))
            if proc.returncode != 0 or not wheels:
                pytest.skip(f"cannot download silero-vad=={SILERO_VERSION} (offline?): {proc.stderr.strip()[-300:]}")
        models_dir.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            for info in zf.infolist():
                if info.filename.startswith(_SILERO_PREFIX) and info.filename.endswith(".onnx"):
                    target = models_dir / Path(info.filename).name  # basename only: never trust archive paths
                    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # concurrent sessions never share a temp file
                    tmp.write_bytes(zf.read(info))
                    tmp.replace(target)
        done.write_text(wheels[0].name + "\n")
    found = {p.stem: p for p in sorted(models_dir.glob("*.onnx"))}
    if not found:
        pytest.fail(f"{models_dir}: no .onnx files extracted from the silero-vad wheel; delete {cache} and rerun")
    return found


@pytest.fixture(scope="session")
def silero_models(request: pytest.FixtureRequest) -> dict[str, Path]:
    """{stem: path} of every ONNX model in the silero-vad 6.2.3 wheel (e.g. 'silero_vad', 'silero_vad_half')."""
    if getattr(request.config, "cache", None) is None:
        pytest.skip("pytest's cache provider is disabled (-p no:cacheprovider); the silero-vad models are cached there")
    cache = Path(request.config.cache.mkdir(f"silero-vad-{SILERO_VERSION}"))
    return _fetch_silero(cache)
