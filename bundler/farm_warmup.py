"""The farm's warm-up plan: which shape sets a farm job runs under which optimization profile, per model.

Warm-up shapes come from the manifest (each model's own) and from the job (``--warmup``, ``[farm].warmup``).
A job's shape names an input (``x``) or, in a bundle of several models, ``MODEL.INPUT`` where the models' inputs
differ; an input name without the prefix applies to every model that has an input of that name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from runtime_shim.errors import BundleError
from runtime_shim.manifest import BundleManifest, Manifest, Profile, Shape

from .part import WarmupRun


def parse_warmup_arg(value: str) -> dict[str, Shape]:
    """``NAME=SHAPE[,NAME=SHAPE...]``: one warm-up run's shapes (dims joined by x), e.g. ``x=8x64``."""
    from .config import ConfigError, parse_dims

    shapes: dict[str, Shape] = {}
    for item in value.split(","):
        name, sep, dims = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--warmup {value!r}: expected NAME=SHAPE (e.g. x=8x64; several inputs: a=1x3,b=1x5)")
        shapes[name.strip()] = parse_dims(dims, where=f"--warmup {value}")
    return shapes


def warmups_by_model(
    bundle: BundleManifest, warmups: Sequence[Mapping[str, Shape]]
) -> dict[str, list[dict[str, Shape]]]:
    """The job's warm-ups split by model: each name is an input of some model, or ``MODEL.INPUT``.

    A one-model bundle keeps every name as given (an unknown input is then reported by ``warmup_plan``, naming
    the model's inputs); in a bundle of several, a name no model has is an error naming each model's inputs.
    """
    inputs = {m.name: [t.name for t in m.inputs] for m in bundle.models}
    out: dict[str, list[dict[str, Shape]]] = {name: [] for name in inputs}
    for w in warmups:
        per: dict[str, dict[str, Shape]] = {}
        for key, shape in w.items():
            owners = [(m, key) for m, names in inputs.items() if key in names]
            # Model names may hold dots too: try every model whose name prefixes the key.
            owners = owners or [
                (m, key[len(m) + 1 :])
                for m, names in inputs.items()
                if key.startswith(m + ".") and key[len(m) + 1 :] in names
            ]
            if not owners and len(inputs) == 1:
                owners = [(next(iter(inputs)), key)]
            if not owners:
                raise BundleError(
                    f"warm-up {_fmt(w)}: no model of the bundle has an input {key!r}",
                    hint="name an input, or MODEL.INPUT for one model's input; the models' inputs: "
                    + "; ".join(f"{m}: {', '.join(names) or '(none)'}" for m, names in inputs.items()),
                )
            for m, name in owners:
                per.setdefault(m, {})[name] = shape
        for m, shapes in per.items():
            out[m].append(shapes)
    return out


def warmup_plan(manifest: Manifest, extra: Sequence[Mapping[str, Shape]] = ()) -> tuple[WarmupRun, ...]:
    """Every (profile, full shape set) to run for one model: each warm-up shape under every profile it fits.

    Inputs a warm-up leaves out take the profile's opt shape (or their fixed shape). Without any warm-up
    shape, each profile's min, opt and max are run, so the cache holds the kernels of its corners.
    """
    specs = {t.name: t for t in manifest.inputs}
    warmups = list(manifest.warmup_shapes) + list(extra)
    profiles: Sequence[Profile] = manifest.profiles or (Profile(shapes={}),)
    for w in warmups:
        for name, shape in w.items():
            if name not in specs:
                raise BundleError(
                    f"warm-up {_fmt(w)}: the bundle has no input {name!r}", hint=f"inputs: {', '.join(specs)}"
                )
            if len(shape) != len(specs[name].shape):
                raise BundleError(
                    f"warm-up {_fmt(w)}: {name!r} has rank {len(specs[name].shape)}, got {len(shape)} dims"
                )

    def full(profile: Profile, given: Mapping[str, Shape]) -> dict[str, Shape] | None:
        out: dict[str, Shape] = {}
        for name, spec in specs.items():
            rng = profile.shapes.get(name)
            shape = given.get(name) or (
                rng.opt if rng else tuple(d if isinstance(d, int) and d >= 0 else 1 for d in spec.shape)
            )
            if rng is not None and not rng.contains(shape):
                return None
            if rng is None and any(isinstance(d, int) and d >= 0 and d != s for d, s in zip(spec.shape, shape)):
                return None
            out[name] = tuple(shape)
        return out

    runs: list[WarmupRun] = []
    for p, profile in enumerate(profiles):
        candidates = warmups or [{n: getattr(r, c) for n, r in profile.shapes.items()} for c in ("min", "opt", "max")]
        for w in candidates:
            shapes = full(profile, w)
            if shapes is not None and all(run.profile != p or run.shapes != shapes for run in runs):
                runs.append(WarmupRun(profile=p, shapes=shapes))
    for w in warmups:
        if not any(all(run.shapes.get(n) == tuple(s) for n, s in w.items()) for run in runs):
            raise BundleError(
                f"warm-up {_fmt(w)} fits no optimization profile of the bundle",
                hint="choose shapes inside a profile's min..max ('trtx-bundle inspect' lists them)",
            )
    return tuple(runs)


def _fmt(shapes: Mapping[str, Shape]) -> str:
    return ",".join(f"{n}={'x'.join(map(str, s))}" for n, s in sorted(shapes.items()))
