"""`inspect` as text: the summary of bundler/describe.py (what --json prints) rendered for people, one model or several."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime_shim.targets import sm_text

from ..coverage import render as render_coverage

_SHOWN_GROUPS = 10  # groups of models sharing blobs, and shared files, listed before "... and N more"


def render(d: Mapping[str, Any]) -> str:
    """The whole summary: a one-model bundle (or --model) as it always read; several models one after the other."""
    if "model" in d:
        narrowed = d["shared"]["models"] > 1  # --model in a bundle of several: that model's part of the weights
        shown = {**d, "weights": d["models"][0]["weights"]} if narrowed else d
        out = [f"bundle   {d['bundle']}"] + model_lines(shown, schema=d["schema_version"])
        if narrowed:
            out += _shared_lines(d)
    else:
        t, names = d["trt_rtx"], [m["model"]["name"] for m in d["models"]]
        out = [
            f"bundle   {d['bundle']}",
            f"schema   {d['schema_version']}; TRT-RTX {t['version']} ({t['cuda_flavour']})",
            f"models   {len(names)}: {_names(names, 20)}",
            "weights  " + _weights_words(d["weights"], "tensors (over all models)"),
        ]
        out += _shared_lines(d)
        for m in d["models"]:
            out += ["", f"== model {m['model']['name']} =="] + model_lines(m, schema=None)
    created = d["creator"]["created"]
    out.append(
        f"created  by {d['creator']['tool']} {d['creator']['version']}"
        + (f" at {created} (SOURCE_DATE_EPOCH)" if created is not None else "")
    )
    out += [f"warning: {msg}" for msg in d["warnings"]]
    return "\n".join(out)


def model_lines(d: Mapping[str, Any], *, schema: int | None) -> list[str]:
    """One model: name, I/O, profiles, warm-ups, weights, parser verdict, engines, caches, coverage."""
    model = d["model"]
    out = [
        f"model    {model['name']} {model['version']} (opset {model['opset']}"
        + (f"; schema {schema})" if schema is not None else ")")
    ]
    if schema is not None:  # with several models the bundle-wide target is said once, at the top
        out.append(f"TRT-RTX  {d['trt_rtx']['version']} ({d['trt_rtx']['cuda_flavour']})")
    out.append("inputs")
    out += [f"  {t['name']:<24} {t['dtype']:<9} {_dims(t['shape'])}" for t in d["inputs"]]
    out += ["outputs"] + [f"  {t['name']:<24} {t['dtype']:<9} {_dims(t['shape'])}" for t in d["outputs"]]
    out.append("profiles" + ("" if d["profiles"] else "  (none: every input is fixed)"))
    for i, p in enumerate(d["profiles"]):
        for n, r in p["shapes"].items():
            out.append(f"  [{i}] {n:<20} {_x(r['min'])} : {_x(r['opt'])} : {_x(r['max'])}")
    if d["warmup_shapes"]:
        out += ["warm-up"] + [
            f"  [{i}] " + ", ".join(f"{n}={_x(s)}" for n, s in ws.items()) for i, ws in enumerate(d["warmup_shapes"])
        ]
    w = d["weights"]
    if "encodings" in w:  # the weight file: the bundle's, which a one-model bundle's model has to itself
        out.append("weights  " + _weights_words(w, "tensors"))
    elif w["raw_bytes"]:
        out.append(
            f"weights  {w['tensors']} tensors in {w['blobs']} blobs: {w['raw_bytes']:,} bytes raw -> "
            f"{w['stored_bytes']:,} stored; {w['shared_blobs']} of the blobs other models use too"
        )
    else:
        out.append("weights  none (the model has no weights)")
    verdict = d["trt_rtx"].get("parse")
    if verdict is not None:
        ops = ", ".join(f"{u['op']} x{u['count']} ({', '.join(u['nodes'])})" for u in verdict["unsupported_ops"])
        out.append(
            f"TRT-RTX  parser: {verdict['status']}"
            + (f": {ops or verdict['detail']}" if ops or verdict["detail"] else "")
        )
    out.append("engines" + ("" if d["engines"] else "  (none)"))
    for e in d["engines"]:
        targets = ", ".join(map(sm_text, e["compute_capabilities"])) or "TRT-RTX default targets"
        out.append(
            f"  {e['kind']:<10} {e['platform']:<13} SM {targets:<24} {e['file']['size']:>12,} bytes  "
            f"{e['file']['sha256'][:12]}"
        )
    out.append("runtime caches" + ("" if d["runtime_caches"] else "  (none)"))
    for c in d["runtime_caches"]:
        k = c["key"]
        out.append(
            f"  {k['gpu_name']} (SM {k['sm']}, {k['os']}, driver >= {k['driver_version']}, {k['cuda_flavour']}): "
            f"{c['file']['size']:,} bytes"
        )
    return out + render_coverage(d["coverage"], with_model=schema is None)


def _shared_lines(d: Mapping[str, Any]) -> list[str]:
    s = d["shared"]
    out = [
        f"shared   {_count(s['blobs'], 'blob')} used by several of the {s['models']} models: {s['raw_bytes']:,} bytes raw, "
        f"{s['stored_bytes']:,} stored",
        f"  weights stored: {s['bundle_stored_bytes']:,} bytes in this bundle; separate bundles, one per model, "
        f"would store {s['separate_stored_bytes']:,} ({s['saved_stored_bytes']:,} saved)",
    ]
    groups = s["by_models"]
    for g in groups[:_SHOWN_GROUPS]:
        out.append(
            f"  {_names(g['models'], 6)}: {_count(g['blobs'], 'blob')}, {g['raw_bytes']:,} bytes raw, "
            f"{g['stored_bytes']:,} stored"
        )
    if len(groups) > _SHOWN_GROUPS:
        out.append(f"  ... and {len(groups) - _SHOWN_GROUPS} more groups of models (--json lists them all)")
    for f in s["files"][:_SHOWN_GROUPS]:
        out.append(f"  file {f['path']}: pinned by {_names(f['models'], 6)}")
    if len(s["files"]) > _SHOWN_GROUPS:
        out.append(f"  ... and {len(s['files']) - _SHOWN_GROUPS} more shared files (--json lists them all)")
    return out


def _weights_words(w: Mapping[str, Any], tensors: str) -> str:
    if not w["raw_bytes"]:
        return "none (the model has no weights)" if tensors == "tensors" else "none (no model has weights)"
    ratio = f"{w['ratio']:.2f}x" if w["ratio"] else "-"
    encodings = ", ".join(f"{k} x{v}" for k, v in w["encodings"].items())
    return (
        f"{w['tensors']} {tensors} in {w['blobs']} blobs: {w['raw_bytes']:,} bytes raw -> {w['stored_bytes']:,} "
        f"stored ({ratio}; {encodings})"
    )


def _names(names: list[str], shown: int) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _x(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _dims(shape: list) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"
