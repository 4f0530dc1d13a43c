"""Several models in one build: which file is which model, and whose input or dim a --shape or --dim names.

Names: each model is named after its file's stem; ``--name`` renames them, once per file in the order given.
``--model-version`` is given once (every model) or once per file. ``[[model]]`` tables in bundle.toml carry
each model's source, name, version and shapes; files on the command line take the tables of their names.

Prefixes: ``--shape MODEL.INPUT=...`` and ``--dim MODEL.DIM=...``. The ``MODEL.`` prefix may be left out when
one model alone has that input (or dim). Input names may hold dots (``input.1``): the longest model name that
prefixes the text is the model, else the whole text is an input's name; text that reads both ways is refused.
The same rule places the top-level [[profiles]], [dims] and [[warmup]] of a bundle.toml without [[model]] tables.

Replacement: any --shape or --dim of a model replaces that model's profiles, dims and warm-ups from bundle.toml
as a whole (the file's warm-ups fit the file's profiles); the other models keep theirs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime_shim.manifest import Profile, Shape, ShapeRange, TensorSpec

from .build import ModelSpec
from .config import (
    BundleConfig,
    ConfigError,
    DimRange,
    ModelConfig,
    parse_dim_values,
    parse_shape_values,
    profiles_from_lists,
)
from .dims import dynamic_dim_names

LoadedSpec = tuple[ModelSpec, Sequence[TensorSpec]]  # a model as build_bundle loaded it, with its inputs


@dataclass(frozen=True, kw_only=True)
class ModelPlan:
    """The models to build, and the shapes that can be placed only once their inputs are known (``fit``)."""

    specs: tuple[ModelSpec, ...]
    notes: tuple[str, ...] = ()
    shapes: tuple[tuple[str, ShapeRange], ...] = ()  # --shape NAME=RANGE, in order, NAME maybe prefixed
    dims: tuple[tuple[str, DimRange], ...] = ()  # --dim NAME=RANGE, likewise
    config: BundleConfig | None = None  # whose top-level shapes (no [[model]] tables) are placed by name
    config_models: frozenset[str] = field(default_factory=frozenset)  # models whose shapes come from a [[model]]

    @property
    def names(self) -> list[str]:
        return [model_name(s) for s in self.specs]

    def fit(self, loaded: Sequence[LoadedSpec]) -> list[ModelSpec]:
        """Each spec with its profiles, dims and warm-ups, the prefixed and unprefixed names placed."""
        names = [model_name(s) for s, _ in loaded]
        inputs = {n: [t.name for t in ins] for n, (_, ins) in zip(names, loaded)}
        dims = {n: dynamic_dim_names(ins) for n, (_, ins) in zip(names, loaded)}
        several = len(names) > 1
        per_input: dict[str, dict[str, list[ShapeRange]]] = {}
        for text, rng in self.shapes:
            m, local = place(text, inputs, kind="input", where=f"--shape {text}")
            per_input.setdefault(m, {}).setdefault(local, []).append(rng)
        per_dim: dict[str, dict[str, list[DimRange]]] = {}
        for text, drange in self.dims:
            m, local = place(text, dims, kind="dynamic dim", where=f"--dim {text}")
            per_dim.setdefault(m, {}).setdefault(local, []).append(drange)
        top = self._top_level(inputs, dims)
        out = []
        for name, (spec, _) in zip(names, loaded):
            if name in per_input or name in per_dim:
                where = f"--shape (model {name!r})" if several else "--shape"
                spec = replace(
                    spec,
                    profiles=profiles_from_lists(per_input.get(name, {}), where=where),
                    dims={d: tuple(r) for d, r in sorted(per_dim.get(name, {}).items())},
                    warmup_shapes=(),
                )
            elif name in top:
                spec = replace(spec, profiles=top[name][0], dims=top[name][1], warmup_shapes=top[name][2])
            out.append(spec)
        return out

    def _top_level(
        self, inputs: Mapping[str, Collection[str]], dims: Mapping[str, Collection[str]]
    ) -> dict[str, tuple[tuple[Profile, ...], dict[str, tuple[DimRange, ...]], tuple[Mapping[str, Shape], ...]]]:
        """The top-level [[profiles]], [dims] and [[warmup]] of bundle.toml, placed per model."""
        c = self.config
        if c is None or not (c.profiles or c.dims or c.warmup_shapes):
            return {}
        models = [n for n in inputs if n not in self.config_models]
        inputs = {n: inputs[n] for n in models}
        dims = {n: dims[n] for n in models}
        profiles: dict[str, list[dict[str, ShapeRange]]] = {n: [] for n in models}
        for k, p in enumerate(c.profiles):
            shapes: dict[str, dict[str, ShapeRange]] = {}
            for text, rng in p.shapes.items():
                m, local = place(text, inputs, kind="input", where=f"{c.source}: profiles[{k}].shapes.{text}")
                shapes.setdefault(m, {})[local] = rng
            for m, s in shapes.items():
                profiles[m].append(s)
        dim_ranges: dict[str, dict[str, tuple[DimRange, ...]]] = {n: {} for n in models}
        for text, ranges in c.dims.items():
            m, local = place(text, dims, kind="dynamic dim", where=f"{c.source}: dims.{text}")
            dim_ranges[m][local] = ranges
        warmups: dict[str, list[Mapping[str, Shape]]] = {n: [] for n in models}
        for i, warm in enumerate(c.warmup_shapes):
            placed = {text: place(text, inputs, kind="input", where=f"{c.source}: warmup[{i}].{text}") for text in warm}
            owners = sorted({m for m, _ in placed.values()})
            if len(owners) > 1:
                raise ConfigError(
                    f"{c.source}: warmup[{i}]: names inputs of {len(owners)} models ({', '.join(owners)})",
                    hint="one warm-up runs one model: split it into one [[warmup]] table per model",
                )
            if owners:
                warmups[owners[0]].append({local: warm[text] for text, (_, local) in placed.items()})
        return {
            n: (tuple(Profile(shapes=s) for s in profiles[n]), dict(sorted(dim_ranges[n].items())), tuple(warmups[n]))
            for n in models
        }


def model_name(spec: ModelSpec) -> str:
    """The name a spec's model gets: its own, else its file's stem."""
    return spec.name or spec.source.stem


def plan_models(
    config: BundleConfig | None,
    files: Sequence[Path],
    *,
    names: Sequence[str] = (),
    versions: Sequence[str] = (),
    shapes: Sequence[str] = (),
    dims: Sequence[str] = (),
) -> ModelPlan:
    """The models of one build from the command line and bundle.toml (rules in the module docstring).

    Everything that needs no model is checked here (counts, names, range syntax); what needs the models' inputs
    is placed by ``ModelPlan.fit`` once build_bundle has loaded them.
    """
    c = config or BundleConfig(source="(defaults)")
    shape_values, dim_values = parse_shape_values(shapes), parse_dim_values(dims)
    notes: list[str] = []
    if files:
        sources = [Path(f) for f in files]
    elif c.models:
        if lacking := [m for m in c.models if m.source is None]:
            raise ConfigError(
                f"{lacking[0].where}: no source = here, and no ONNX file on the command line",
                hint="give each [[model]] table source = (relative to bundle.toml), or pass the files",
            )
        sources = [m.source for m in c.models if m.source is not None]
    else:
        raise ConfigError(
            "no model given",
            hint="pass ONNX files (trtx-bundle build det.onnx rec.onnx -o ocr/), or --config with [[model]] tables",
        )
    n = len(sources)
    listed = ", ".join(str(s) for s in sources)
    if names and len(names) != n:
        raise ConfigError(
            f"--name given {len(names)} time(s) for {n} model(s) ({listed})",
            hint="give --name once per file, in the files' order, or leave it out (a model is named after its "
            "file's stem)",
        )
    if versions and len(versions) not in (1, n):
        raise ConfigError(
            f"--model-version given {len(versions)} times for {n} models ({listed})",
            hint="give it once (every model) or once per file, in the files' order",
        )
    if c.name is not None and n > 1 and not names:
        raise ConfigError(
            f"{c.source}: model.name names one model, but {n} are built ({listed})",
            hint="name them with --name once per file, or with [[model]] tables (one per model)",
        )
    tables: list[ModelConfig | None]
    if files:
        chosen = [names[i] if names else (c.name if n == 1 and c.name else s.stem) for i, s in enumerate(sources)]
        by_name = {m.model_name: m for m in c.models}
        tables = [by_name.get(name) for name in chosen]
        for m in c.models:
            if m.model_name not in chosen:
                notes.append(
                    f"{m.where} (model {m.model_name!r}): no file on the command line has that name; left out "
                    f"(the models: {', '.join(chosen)})"
                )
    else:
        tables = list(c.models)
        chosen = [names[i] if names else t.model_name for i, t in enumerate(c.models)]
    specs = []
    for i, (source, name, table) in enumerate(zip(sources, chosen, tables)):
        version = versions[i if len(versions) > 1 else 0] if versions else None
        specs.append(
            ModelSpec(
                source=source,
                name=name,
                version=version or (table.version if table else None) or c.version or "0",
                profiles=table.profiles if table else (),
                dims=table.dims if table else {},
                warmup_shapes=table.warmup_shapes if table else (),
            )
        )
    return ModelPlan(
        specs=tuple(specs),
        notes=tuple(notes),
        shapes=tuple(shape_values),
        dims=tuple(dim_values),
        config=c,
        config_models=frozenset(name for name, t in zip(chosen, tables) if t is not None),
    )


def place(text: str, owners: Mapping[str, Collection[str]], *, kind: str, where: str) -> tuple[str, str]:
    """(model, name) that ``text`` names: ``MODEL.NAME``, or ``NAME`` alone where one model alone has it.

    ``owners`` maps each model to its inputs (or dims). With one model, a name it lacks stays as it is, for the
    model's own checks to report (they list its inputs).
    """
    whole = [m for m, have in owners.items() if text in have]
    prefix = max((m for m in owners if text.startswith(m + ".") and len(text) > len(m) + 1), key=len, default=None)
    if prefix is not None:
        local = text[len(prefix) + 1 :]
        if local in owners[prefix] and whole:
            raise ConfigError(
                f"{where}: ambiguous: {kind} {local!r} of model {prefix!r}, or the {kind} {text!r} of "
                f"{', '.join(map(repr, whole))}",
                hint=f"rename one of the models with --name (the models: {', '.join(owners)})",
            )
        if local in owners[prefix] or not whole:
            if local not in owners[prefix] and len(owners) > 1:
                raise ConfigError(
                    f"{where}: model {prefix!r} has no {kind} named {local!r}",
                    hint=_listing(owners, kind),
                )
            return prefix, local
    if len(whole) == 1:
        return whole[0], text
    if whole:
        raise ConfigError(
            f"{where}: {len(whole)} models have {_a(kind)} named {text!r}: {', '.join(whole)}",
            hint="say which with the model's name: " + " or ".join(f"{m}.{text}" for m in whole),
        )
    if len(owners) == 1:
        return next(iter(owners)), text
    head = text.split(".", 1)[0]
    raise ConfigError(
        f"{where}: "
        + (f"no model named {head!r}, and " if "." in text else "")
        + f"no model has {_a(kind)} named {text!r}",
        hint=_listing(owners, kind),
    )


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _listing(owners: Mapping[str, Collection[str]], kind: str) -> str:
    per_model = "; ".join(f"{m}: {', '.join(have) or '(none)'}" for m, have in owners.items())
    return f"the models are {', '.join(owners)}; their {kind}s: {per_model} (write MODEL.NAME)"
