"""Dynamic dims as users think of them: one range per named dim, shared by every input that uses it.

Fits what the user gave (whole inputs from --shape / [[profiles]], named dims from --dim / [dims]) to the
model's inputs as optimization profiles, and checks every profile the way TRT-RTX will (one range per dim
name within a profile; 1 <= min <= opt <= max) before any engine is built, so a mistake costs no build.

Which axes are one dim: TRT-RTX takes every dim of one name to be the same dim, so
- a placeholder name (``"?"``, ``""``) ties nothing: each such axis is renamed ``dim_<tensor>_<axis>`` (the
  name unnamed dims get) in the graph the engine and the skeleton are made from, and in the I/O specs;
- a name given ranges on two axes that no single size fits (224 and 320, say) names unrelated axes: the
  exporter reused it, and its axes are renamed the same way, with a note;
- a name given different but overlapping ranges is a mistake, refused with the dim, the inputs and the values.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Protocol

import onnx

from runtime_shim.manifest import Profile, Shape, ShapeRange, TensorSpec

from .config import ConfigError, DimRange, DimRanges, check_warmups, fmt_shape


class LoadedModel(Protocol):
    """What dims needs of onnx_model.LoadedModel (a Protocol, so that onnx_model can import dims without a cycle)."""

    proto: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    renamed_dims: dict[str, str]


PLACEHOLDER_DIMS = frozenset({"?", ""})  # dim_param values that name no dim: each axis gets a name of its own
SUGGESTED = DimRange(1, 8, 64)  # the range suggestions show for a dim nobody gave: the user puts real sizes
DIMS_SOURCE = "--dim/[dims]"
Axis = tuple[str, int]  # (input name, axis)


def axis_dim_name(tensor: str, axis: int) -> str:
    """The name of an axis that has no dim name of its own (unnamed, a placeholder, or a name reused for unrelated axes)."""
    return f"dim_{tensor}_{axis}"


# --------------------------------------------------------------------------- the graph's dim names
def rename_dims(model: LoadedModel, renames: Mapping[Axis, str]) -> None:
    """Give each (graph input or output, axis) in ``renames`` a new dim name, in the graph and in the I/O specs.

    The graph the engine is built from and the skeleton then agree with the manifest, so TRT-RTX sees
    distinct dims and the shim checks inputs against the names the engine was built with.
    """
    graph = model.proto.graph
    for vi in [*graph.input, *graph.output]:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            new = renames.get((vi.name, axis))
            if new is not None and not d.HasField("dim_value"):
                model.renamed_dims.setdefault(new, d.dim_param)
                d.dim_param = new

    def renamed(spec: TensorSpec) -> TensorSpec:
        shape = tuple(renames.get((spec.name, axis), dim) for axis, dim in enumerate(spec.shape))
        return spec if shape == spec.shape else replace(spec, shape=shape)

    model.inputs = tuple(renamed(t) for t in model.inputs)
    model.outputs = tuple(renamed(t) for t in model.outputs)


def distinct_placeholders(model: LoadedModel) -> None:
    """Placeholder dim names become per-axis names on the graph's inputs and outputs and are cleared elsewhere.

    Inside the graph (value_info, subgraph signatures) a placeholder would still tie unrelated axes together
    for a reader that trusts names; an unnamed dim constrains nothing.
    """
    graph = model.proto.graph
    renames = {
        (vi.name, axis): axis_dim_name(vi.name, axis)
        for vi in [*graph.input, *graph.output]
        for axis, d in enumerate(vi.type.tensor_type.shape.dim)
        if d.HasField("dim_param") and d.dim_param in PLACEHOLDER_DIMS
    }
    if renames:
        rename_dims(model, renames)
    for g in _graphs(graph):
        for vi in [*g.value_info] if g is graph else [*g.input, *g.output, *g.value_info]:
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in PLACEHOLDER_DIMS:
                    d.ClearField("dim_param")


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _graphs(g)


def reused_dim_renames(inputs: Sequence[TensorSpec], profiles: Sequence[Profile]) -> dict[Axis, str]:
    """The axes of each dim name that the given per-input ranges show to be unrelated (no one size fits two)."""
    specs = {t.name: t for t in inputs}
    split: set[str] = set()
    for profile in profiles:
        seen: dict[str, list[DimRange]] = {}
        for name, rng in profile.shapes.items():
            spec = specs.get(name)
            if spec is None or len(rng.min) != len(spec.shape):
                continue  # resolve_profiles reports it
            for axis, dim in _dynamic(spec):
                r = _axis_range(rng, axis)
                if any(r.disjoint(o) for o in seen.get(dim, ())):
                    split.add(dim)
                seen.setdefault(dim, []).append(r)
    return {(t.name, axis): axis_dim_name(t.name, axis) for t in inputs for axis, dim in _dynamic(t) if dim in split}


def fit_profiles(
    model: LoadedModel,
    profiles: Sequence[Profile],
    dims: DimRanges,
    *,
    source: str,
    note: Callable[[str], None] = lambda _: None,
) -> tuple[Profile, ...]:
    """Rename the reused dims ``profiles`` reveal, then resolve and check the profiles against the renamed model."""
    renames = reused_dim_renames(model.inputs, profiles)
    if renames:
        rename_dims(model, renames)
    by_old: dict[str, list[str]] = {}
    for new, old in model.renamed_dims.items():
        by_old.setdefault(old, []).append(new)
    for old, new_names in sorted(by_old.items()):
        why = "a placeholder" if old in PLACEHOLDER_DIMS else "given ranges no single size fits"
        note(f"{source}: dim {old!r} ({why}) is built as distinct dims: {', '.join(sorted(new_names))}")
    return resolve_profiles(model.inputs, profiles, dims, source=source, renamed=model.renamed_dims)


def fit_warmups(
    inputs: Sequence[TensorSpec],
    profiles: Sequence[Profile],
    warmups: Sequence[Mapping[str, Shape]],
    *,
    source: str,
    note: Callable[[str], None] = lambda _: None,
) -> tuple[Mapping[str, Shape], ...]:
    """The warm-up shapes to keep: each checked against the model and its profiles (config.check_warmups).

    Warm-ups that name none of the model's inputs were written for another model (a shared bundle.toml): they
    are left out with a note, and the warm-ups follow the profiles (the farm runs each one's min, opt and max).
    """
    names = {t.name for t in inputs}
    if warmups and not any(names & set(w) for w in warmups):
        given = sorted({n for w in warmups for n in w})
        note(
            f"{source}: the warm-up shapes given name none of the model's inputs ({', '.join(given)}); left out, "
            "so the farm runs each profile's min, opt and max"
        )
        return ()
    check_warmups(inputs, profiles, warmups, source=source)
    return tuple(warmups)


# --------------------------------------------------------------------------- profiles
def resolve_profiles(
    inputs: Sequence[TensorSpec],
    profiles: Sequence[Profile],
    dims: DimRanges | None = None,
    *,
    source: str,
    renamed: Mapping[str, str] | None = None,
) -> tuple[Profile, ...]:
    """Profiles covering every dynamic input, from whole-input ranges plus one range per named dim.

    An input not given whole takes its ranges from its dims' names: from ``dims``, else from another input of
    the same profile that has the dim. Fixed inputs may be left out (TRT-RTX knows their shape) but, when
    given, must match the model. Every missing range is reported at once; every profile is then checked.
    """
    dims = dims or {}
    specs = {t.name: t for t in inputs}
    for i, profile in enumerate(profiles):
        _check_against_model(specs, profile, _where(source, i, len(profiles)))
    _check_dim_names(inputs, dims, source, renamed or {})
    n = max([len(profiles), *(len(r) for r in dims.values())], default=0)
    uneven = [f"--shape/[[profiles]] make {len(profiles)}"] if len(profiles) not in (0, 1, n) else []
    uneven += [f"dim {name!r} is given {len(r)} times" for name, r in sorted(dims.items()) if len(r) not in (1, n)]
    if uneven:
        raise ConfigError(
            f"{source}: {n} profiles, but " + ", ".join(uneven),
            hint="give each input or dim either once (it applies to every profile) or once per profile",
        )
    dynamic = [t for t in inputs if t.dynamic_axes]
    if n == 0 and not dynamic:
        return ()
    out: list[Profile] = []
    missing: dict[str, list[Axis]] = {}
    missing_in: set[int] = set()
    first_known: dict[str, DimRange] = {}
    for k in range(max(n, 1)):
        where = _where(source, k, n)
        given = dict(profiles[k if len(profiles) > 1 else 0].shapes) if profiles else {}
        sources: dict[str, list[tuple[str, DimRange]]] = {}
        for name, ranges in sorted(dims.items()):
            sources.setdefault(name, []).append((f"{DIMS_SOURCE} {name}", ranges[k if len(ranges) > 1 else 0]))
        for t in inputs:  # in the model's order, as the user reads the inputs
            if t.name in given:
                for axis, dim in _dynamic(t):
                    sources.setdefault(dim, []).append(
                        (f"input {t.name!r} axis {axis}", _axis_range(given[t.name], axis))
                    )
        for dim, found in sources.items():
            _require_one_range(where, dim, found)
        known = {dim: found[0][1] for dim, found in sources.items()}
        if k == 0:
            first_known = known
        for t in dynamic:
            if t.name in given:
                continue
            lacking = [(axis, dim) for axis, dim in _dynamic(t) if dim not in known]
            for axis, dim in lacking:
                if (t.name, axis) not in missing.setdefault(dim, []):
                    missing[dim].append((t.name, axis))
                missing_in.add(k)
            if not lacking:
                given[t.name] = _input_range(t, known)
        out.append(Profile(shapes=dict(sorted(given.items()))))
    if missing:
        raise _missing_error(source, inputs, missing, first_known, sorted(missing_in) if n > 1 else [])
    for k, profile in enumerate(out):
        check_profile(inputs, profile, where=_where(source, k, len(out)))
    return tuple(out)


def check_profile(inputs: Sequence[TensorSpec], profile: Profile, *, where: str) -> None:
    """What TRT-RTX requires of a profile: per axis 1 <= min <= opt <= max, and one range per dim name."""
    sources: dict[str, list[tuple[str, DimRange]]] = {}
    for spec in inputs:
        name, rng = spec.name, profile.shapes.get(spec.name)
        if rng is None:
            continue
        if problem := rng.problem():
            raise ConfigError(f"{where}: input {name!r}: {problem}", hint="each dim must satisfy min <= opt <= max")
        for axis, dim in _dynamic(spec):
            r = _axis_range(rng, axis)
            if r.min < 1:
                raise ConfigError(
                    f"{where}: input {name!r} axis {axis} (dim {dim!r}): sizes must be >= 1, got {r.text()}",
                    hint="a dynamic dim's range starts at 1 or more",
                )
            sources.setdefault(dim, []).append((f"input {name!r} axis {axis}", r))
    for dim, found in sources.items():
        _require_one_range(where, dim, found)


def _require_one_range(where: str, dim: str, found: Sequence[tuple[str, DimRange]]) -> None:
    if len({r for _, r in found}) > 1:
        values = ", ".join(f"{who} = {r.text()}" for who, r in found)
        raise ConfigError(
            f"{where}: dim {dim!r} has different ranges (MIN:OPT:MAX): {values}",
            hint=f"TensorRT for RTX needs one range per dim name in a profile: give it once with "
            f"--dim {shlex.quote(f'{dim}={found[0][1].text()}')} (or [dims] in bundle.toml) and the same "
            "values in any --shape that has it, or leave those inputs out of --shape",
        )


def _check_against_model(specs: Mapping[str, TensorSpec], profile: Profile, where: str) -> None:
    for name, rng in profile.shapes.items():
        spec = specs.get(name)
        if spec is None:
            raise ConfigError(
                f"{where}: no model input named {name!r}",
                hint=f"the model's inputs are: {', '.join(specs) or '(none)'}",
            )
        if len(rng.min) != len(spec.shape):
            raise ConfigError(
                f"{where}: {name!r} has rank {len(spec.shape)} {fmt_shape(spec.shape)}, but the range given has rank {len(rng.min)} ({'x'.join(map(str, rng.min))})",
                hint=f"give {len(spec.shape)} dims, e.g. --shape {name}={_example_range(spec, {})}",
            )
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim >= 0 and not (rng.min[axis] == rng.opt[axis] == rng.max[axis] == dim):
                raise ConfigError(
                    f"{where}: {name!r} axis {axis} is fixed at {dim} in the model, but the range gives {rng.min[axis]}/{rng.opt[axis]}/{rng.max[axis]}",
                    hint=f"keep fixed dims as they are: e.g. --shape {name}={_example_range(spec, {})}",
                )


def _check_dim_names(inputs: Sequence[TensorSpec], dims: DimRanges, source: str, renamed: Mapping[str, str]) -> None:
    uses: dict[str, list[str]] = {}
    for t in inputs:
        for axis, dim in _dynamic(t):
            uses.setdefault(dim, []).append(f"{t.name} axis {axis}")
    unknown = sorted(set(dims) - set(uses))
    if not unknown:
        return
    now = {old: sorted(new for new, o in renamed.items() if o == old) for old in unknown if old in renamed.values()}
    known = "; ".join(f"{dim} ({', '.join(where)})" for dim, where in uses.items()) or "(none: every input is fixed)"
    raise ConfigError(
        f"{source}: {DIMS_SOURCE} {', '.join(map(repr, unknown))}: the model's inputs have no dynamic dim of that name",
        hint=f"the model's dynamic dims: {known}"
        + "".join(
            f"; {old!r} names unrelated axes in this model, so each has its own name: {', '.join(new)}"
            for old, new in now.items()
        ),
    )


def _missing_error(
    source: str,
    inputs: Sequence[TensorSpec],
    missing: Mapping[str, Sequence[Axis]],
    known: Mapping[str, DimRange],
    profiles: Sequence[int],
) -> ConfigError:
    names = list(missing)
    lacking = {name for axes in missing.values() for name, _ in axes}
    affected = [t for t in inputs if t.name in lacking]
    in_profiles = f" in profile{'s' if len(profiles) > 1 else ''} {', '.join(map(str, profiles))}" if profiles else ""
    dim_line = " ".join(f"--dim {shlex.quote(f'{name}={SUGGESTED.text()}')}" for name in names)
    shape_line = " ".join(f"--shape {shlex.quote(f'{t.name}={_example_range(t, known)}')}" for t in affected)
    return ConfigError(
        f"{source}: no range for the dynamic dim{'s' if len(names) > 1 else ''} {', '.join(names)}{in_profiles}; "
        + "; ".join(f"input {t.name!r} has dynamic dims {fmt_shape(t.shape)}" for t in affected),
        hint=f"pass {dim_line} (MIN:OPT:MAX with your sizes; one range per dim, shared by every input that uses "
        f"it), or put them under [dims] in bundle.toml; or set whole inputs: {shape_line}",
    )


# --------------------------------------------------------------------------- small helpers
def dynamic_dim_names(inputs: Sequence[TensorSpec]) -> list[str]:
    """The names of the inputs' dynamic dims, each once, in the inputs' order (what --dim can name)."""
    return list(dict.fromkeys(dim for t in inputs for _, dim in _dynamic(t)))


def _dynamic(spec: TensorSpec) -> Iterator[tuple[int, str]]:
    """(axis, dim name) of each dynamic axis; an unnamed one (-1, from a manifest) gets its axis name."""
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, str):
            yield axis, dim
        elif dim < 0:
            yield axis, axis_dim_name(spec.name, axis)


def _axis_range(rng: ShapeRange, axis: int) -> DimRange:
    return DimRange(rng.min[axis], rng.opt[axis], rng.max[axis])


def _input_range(spec: TensorSpec, known: Mapping[str, DimRange]) -> ShapeRange:
    names = dict(_dynamic(spec))
    per_axis = [known[names[a]] if a in names else DimRange(int(d), int(d), int(d)) for a, d in enumerate(spec.shape)]
    return ShapeRange(
        min=tuple(r.min for r in per_axis), opt=tuple(r.opt for r in per_axis), max=tuple(r.max for r in per_axis)
    )


def _example_range(spec: TensorSpec, known: Mapping[str, DimRange]) -> str:
    """A ready --shape range in the model's own dims: fixed dims kept, known dims' ranges, else SUGGESTED."""
    shape = _input_range(spec, {d: known.get(d, SUGGESTED) for _, d in _dynamic(spec)})
    return ":".join("x".join(map(str, s)) for s in (shape.min, shape.opt, shape.max))


def _where(source: str, k: int, n: int) -> str:
    return f"{source}: profile {k}" if n > 1 else source
