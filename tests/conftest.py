"""Shared pytest fixtures: the real silero-vad ONNX models, fetched once into pytest's cache; a chunked weight frame;
the C-helper-or-numpy switch of the weight decoders."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    f"silero-vad=={SILERO_VERSION}",
                    "-d",
                    str(cache),
                ],
                capture_output=True,
                text=True,
            )
            wheels = sorted(cache.glob(f"silero_vad-{SILERO_VERSION}-*.whl"))
            if proc.returncode != 0 or not wheels:
                pytest.skip(f"cannot download silero-vad=={SILERO_VERSION} (offline?): {proc.stderr.strip()[-300:]}")
        models_dir.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            for info in zf.infolist():
                if info.filename.startswith(_SILERO_PREFIX) and info.filename.endswith(".onnx"):
                    target = models_dir / Path(info.filename).name  # basename only: never trust archive paths
                    tmp = target.with_name(
                        f".{target.name}.{os.getpid()}.tmp"
                    )  # concurrent sessions never share a temp file
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


@pytest.fixture(scope="session")
def chunked_frame() -> tuple[np.ndarray, bytes, int]:
    """A layout-2 frame of float32 values as the writer makes it, whose exponent plane is chunked in 2 zstd chunks:
    ``(values, stored frame, offset of the chunked plane's table in it)``, for tests that damage chunks."""
    import struct

    from bundler.store_writer import encode_frame
    from runtime_shim.store.format import PLANE_ZSTD_CHUNKS

    values = (np.random.default_rng(9).standard_normal(100_000) * 0.02).astype(np.float32)
    stored = encode_frame(values.tobytes(), "zstd-byteplane", 4, 3)
    modes = [stored[4 + 5 * k] for k in range(4)]
    assert PLANE_ZSTD_CHUNKS in modes
    k = modes.index(PLANE_ZSTD_CHUNKS)
    sizes = [struct.unpack_from("<I", stored, 5 + 5 * j)[0] for j in range(4)]
    return values, stored, 4 + 5 * 4 + sum(sizes[:k])


@pytest.fixture(params=["native", "numpy"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test once with the shim's C helper (runtime_shim.store._planes) and once with its numpy fallback: the
    weight reader's decoding and the GPU planner's slot checks both follow runtime_shim.store.decode.use_native."""
    from runtime_shim.store.decode import native_built, use_native

    if request.param == "native" and not native_built():
        pytest.skip("the C helper runtime_shim.store._planes was not built (no C compiler at install)")
    before = use_native(request.param == "native")
    try:
        yield request.param
    finally:
        use_native(before)
