"""What TensorRT for RTX 1.7 targets: the one place that knows which GPU architectures (SMs) it serves."""

from __future__ import annotations

# ComputeCapability members of TRT-RTX 1.7 by SM (10 * major + minor). Hopper (90) and SM 10.x are not among them.
CC_NAMES = {75: "SM75", 80: "SM80", 86: "SM86", 89: "SM89", 120: "SM120", 121: "SM121"}
# The SMs an AOT build can name explicitly (weightful multi-SM engines, config `build.sm`, `--sm`).
SUPPORTED_SMS = tuple(sorted(CC_NAMES))
# Below SM 12.0 only these run; from 12.0 on every SM does (future 12.x parts ship after this release).
_SUPPORTED_BELOW_120 = frozenset({75, 80, 86, 89})
# Names people know GPU families by, for SMs TRT-RTX refuses.
_UNSUPPORTED_FAMILY = {
    90: "Hopper, a data-center GPU",
    100: "Blackwell data-center",
    103: "Blackwell data-center",
    110: "Thor",
    87: "Jetson Orin",
    70: "Volta",
    72: "Xavier",
}
SUPPORT_TEXT = "it targets SM 7.5, 8.0, 8.6, 8.9 and 12.x: RTX and workstation GPUs"


def sm_text(sm: int) -> str:
    """A compute capability as people write it: 89 -> "8.9", 120 -> "12.0"."""
    return f"{sm // 10}.{sm % 10}"


def trt_rtx_supports(sm: int) -> bool:
    """Whether TensorRT for RTX 1.7 can run engines on a GPU of this compute capability (89 = SM 8.9)."""
    return sm in _SUPPORTED_BELOW_120 or sm >= 120


def family_text(sm: int) -> str:
    """ " (Hopper, a data-center GPU)" for SMs with a well-known family name, else ""."""
    family = _UNSUPPORTED_FAMILY.get(sm)
    return f" ({family})" if family else ""
