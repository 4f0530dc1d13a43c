"""The load report: what load() chose and why (engine, runtime cache, machine, timings), and why not TRT-RTX."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(kw_only=True)
class Report:
    """What load() chose and why; ``to_dict()`` is JSON-ready, ``lines()`` is for people."""

    bundle: str
    model: str  # the model this session runs
    models: list[str] = field(default_factory=list)  # every model of the bundle, in manifest order
    backend: str = ""  # "tensorrt_rtx" | "onnxruntime"
    engine: dict[str, Any] | None = None
    runtime_cache: str | None = None  # which cache TRT-RTX accepted, in words
    why_not_trt: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] | None = None
    engine_choices: list[dict[str, Any]] = field(default_factory=list)
    cache_choices: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    cache_dir: str = ""
    signature: dict[str, Any] | None = None  # signing.SignatureStatus: present, verified (None: not checked), ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        others = [m for m in self.models if m != self.model]
        of = f"; the bundle also holds {', '.join(others)}" if others else ""
        out = [f"bundle {self.bundle} (model {self.model}{of})", f"backend: {self.backend or 'none'}"]
        if self.gpu:
            out.append(
                f"GPU {self.gpu['index']}: {self.gpu['name']} (SM {self.gpu['sm_text']}, device 0x{self.gpu['pci_device_id']:04x})"
            )
        if self.why_not_trt:
            out.append(f"TensorRT for RTX not used: {self.why_not_trt}")
        if self.engine:
            out.append(f"engine: {self.engine.get('kind')} {self.engine.get('file', '')}")
        out.append(f"runtime cache: {self.runtime_cache or 'none (kernels compiled on first use)'}")
        if self.signature is not None:
            out.append(f"signature: {_signature_words(self.signature)}")
        out += [f"warning: {w}" for w in self.warnings]
        out.append("timings: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in self.timings.items()))
        return out


def _signature_words(sig: dict[str, Any]) -> str:
    if not sig.get("present"):
        return "none (the bundle is not signed)"
    if not sig.get("verified"):
        return "present, not checked (no trusted keys given)"
    return f"verified ({sig.get('kind')} {sig.get('key') or sig.get('identity')})"
