"""Input checks before any backend runs: names, dtypes, ranks, fixed and named dims, and the shape profiles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError
from .manifest import Manifest


def validate_inputs(manifest: Manifest, inputs: Mapping[str, Any], profile: int | None = None) -> int:
    """Names, dtypes, ranks, fixed dims and profile ranges, checked before any backend runs (InputError).

    Returns the optimization profile to run under: ``profile`` if given (it must hold the shapes), else the
    first profile that holds them (0 for a bundle without profiles).
    """
    if not isinstance(inputs, Mapping):
        raise InputError(f"run() takes a dict of input name -> numpy array, got {type(inputs).__name__}")
    expected = [t.name for t in manifest.inputs]
    missing, extra = [n for n in expected if n not in inputs], sorted(set(inputs) - set(expected))
    if missing or extra:
        raise InputError(
            f"inputs: expected {expected}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else "")
        )
    named: dict[str, tuple[str, int]] = {}
    for spec in manifest.inputs:
        a = inputs[spec.name]
        if not isinstance(a, np.ndarray):
            raise InputError(
                f"input {spec.name!r}: expected a numpy array, got {type(a).__name__}",
                hint="wrap it with numpy.asarray(...)",
            )
        if a.dtype.name != spec.dtype:
            raise InputError(
                f"input {spec.name!r}: expected dtype {spec.dtype}, got {a.dtype.name}",
                hint=f"convert with .astype('{spec.dtype}')",
            )
        if a.ndim != len(spec.shape):
            raise InputError(
                f"input {spec.name!r}: expected rank {len(spec.shape)} (shape {list(spec.shape)}), got rank {a.ndim} {a.shape}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, a.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise InputError(f"input {spec.name!r}: axis {axis} must be {want}, got {got} (shape {a.shape})")
            if isinstance(want, str):
                if want in named and named[want][1] != got:
                    raise InputError(
                        f"input {spec.name!r}: axis {axis} ({want!r}) is {got}, but {named[want][0]!r} has {want!r} = {named[want][1]}"
                    )
                named.setdefault(want, (spec.name, got))
    if not manifest.profiles:
        if profile not in (None, 0):
            raise InputError(f"profile {profile}: this bundle has no optimization profiles")
        return 0
    if profile is not None and not 0 <= profile < len(manifest.profiles):
        raise InputError(
            f"profile {profile}: this bundle has {len(manifest.profiles)} optimization profile(s), 0..{len(manifest.profiles) - 1}"
        )
    candidates = [profile] if profile is not None else range(len(manifest.profiles))
    for i in candidates:
        if all(r.contains(tuple(inputs[n].shape)) for n, r in manifest.profiles[i].shapes.items()):
            return i
    i = candidates[0]
    detail = "; ".join(
        f"{n}: shape {list(inputs[n].shape)}, min {list(r.min)}, max {list(r.max)}"
        for n, r in manifest.profiles[i].shapes.items()
        if not r.contains(tuple(inputs[n].shape))
    )
    raise InputError(
        f"inputs outside the bundle's shape profile{'' if len(manifest.profiles) == 1 else f' {i}'} ({detail})",
        hint="split or pad the input, or rebuild the bundle with a wider profile (--shape NAME=MIN:OPT:MAX)",
    )
