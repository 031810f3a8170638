"""What this CPU can do, and which int8/int4 kernel forms are exact and fast on it.

Why it matters: ONNX Runtime's int8 MatMul (MLAS) picks a kernel by CPU feature, and the kernels do
not all compute the same thing. On x86 without VNNI, the u8 x s8 kernel multiplies pairs of bytes with
AVX2's `vpmaddubsw`, whose 16-bit sums saturate: with activations stored as u8 around zero point 128
and full-range s8 weights, a pair can reach 2 x 255 x 127 = 64770 > 32767, and in our measurements
every output of a KoGPT2-sized MatMul came out wrong (`benchmarks/RESULTS.md`). VNNI's `vpdpbusd`,
AMX and ARM's NEON/dot-product kernels accumulate in 32 bits and are exact. The u8 x u8 kernel widens
to 16 bits before multiplying (`vpmaddwd`) and is exact on every x86 CPU. So kolite stores int8
weights as s8 where u8 x s8 is exact, and as u8 (the same values shifted by 128) elsewhere: the
integer products, and so the results, are the same on every CPU.

Features come from `/proc/cpuinfo` (Linux, both architectures); nothing here needs a library.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

Int8Weights = Literal["s8", "u8"]

# x86 features that give MLAS an exact (32-bit accumulating) u8 x s8 kernel.
_X86_EXACT_U8S8 = ("avx512_vnni", "avx_vnni", "amx_int8")
# Features worth logging, in the order they are shown.
_SHOWN = {
    "x86_64": ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"),
    "aarch64": ("asimd", "asimddp", "i8mm", "sve", "sve2", "bf16", "fphp"),
}


@dataclass(frozen=True)
class CpuInfo:
    """The facts about a CPU that decide kolite's kernels: architecture, name and feature flags."""

    arch: str  # platform.machine(): "x86_64", "aarch64", ...
    model: str
    flags: frozenset[str]

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i686", "i386")

    @property
    def is_arm64(self) -> bool:
        return self.arch in ("aarch64", "arm64")

    def has(self, *names: str) -> bool:
        return any(n in self.flags for n in names)

    @property
    def exact_u8s8(self) -> bool:
        """Whether ONNX Runtime's u8 x s8 int8 MatMul is exact here (no 16-bit saturation)."""
        return not self.is_x86 or self.has(*_X86_EXACT_U8S8)

    @property
    def int8_weights(self) -> Int8Weights:
        """How int8 weights are stored for this CPU: s8 where u8 x s8 is exact (it is the faster
        kernel there), else u8 with zero point 128 (exact everywhere; on AVX2 it costs prefill speed)."""
        return "s8" if self.exact_u8s8 else "u8"

    @property
    def int8_kernel(self) -> str:
        """The int8 MatMul kernel family ONNX Runtime will use, for the log."""
        if self.is_x86:
            for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")):
                if self.has(flag):
                    return f"{name} u8s8"
            return ("AVX-512BW" if self.has("avx512bw") else "AVX2" if self.has("avx2") else "SSE") + " u8u8"
        if self.is_arm64:
            if self.has("i8mm"):
                return "NEON i8mm"
            return "NEON dot product" if self.has("asimddp") else "NEON (no dot product)"
        return "generic"

    @property
    def int4_fast(self) -> bool:
        """Whether ONNX Runtime's 4-bit MatMulNBits has its integer kernel here (x86 AVX2 or better,
        ARM with dot product); without it, it falls back to a slower float path."""
        if self.is_x86:
            return self.has("avx2")
        if self.is_arm64:
            return self.has("asimddp")
        return False

    def summary(self) -> str:
        shown = [f for f in _SHOWN.get("aarch64" if self.is_arm64 else "x86_64", ()) if f in self.flags]
        return f"{self.model} ({self.arch}; {' '.join(shown) or 'no SIMD flags found'})"

    def to_dict(self) -> dict[str, object]:
        shown = _SHOWN.get("aarch64" if self.is_arm64 else "x86_64", ())
        return {"arch": self.arch, "model": self.model, "features": [f for f in shown if f in self.flags],
                "int8_kernel": self.int8_kernel, "int8_weights": self.int8_weights, "int4_fast": self.int4_fast}


def parse_cpuinfo(text: str, arch: str) -> CpuInfo:
    """Read the first processor's flags (x86 `flags`, ARM `Features`) and name from /proc/cpuinfo text.

    x86 prints a model name; arm64 kernels print only part numbers, mapped here to core names.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    name = fields.get("model name", "")
    if not name or name.startswith("ARMv"):  # 32-bit Pi OS says "ARMv7 Processor rev 3 (v7l)"
        with contextlib.suppress(ValueError, KeyError):
            if int(fields["cpu implementer"], 16) == 0x41 and int(fields["cpu part"], 16) in _ARM_PARTS:
                name = "ARM " + _ARM_PARTS[int(fields["cpu part"], 16)]
    return CpuInfo(arch=arch, model=name or fields.get("hardware") or arch or "unknown CPU", flags=flags)


# ARM's CPU part numbers (/proc/cpuinfo "CPU part", implementer 0x41).
_ARM_PARTS = {
    0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57", 0xD08: "Cortex-A72",
    0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76", 0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77",
    0xD40: "Neoverse-V1", 0xD41: "Cortex-A78", 0xD44: "Cortex-X1", 0xD46: "Cortex-A510", 0xD47: "Cortex-A710",
    0xD49: "Neoverse-N2", 0xD4F: "Neoverse-V2", 0xD80: "Cortex-A520", 0xD81: "Cortex-A720",
}


@cache
def detect() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    arch = platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no flags known, so choose the forms that are exact everywhere
        text = ""
    return parse_cpuinfo(text, arch)


def auto_precision(cpu: CpuInfo) -> str:
    """`--precision auto`: int8 on every CPU kind measured (benchmarks/RESULTS.md, by CPU).

    Why not int4 where it is faster: its agreement with fp32 (cosine 0.93-0.98 on random weights) is
    below the quality floor int8 meets on every CPU (>= 0.999 with the right weight form), and on ARM
    without dot product (Pi 4) its kernel falls back. fp32 is exact but 2x the memory and slower.
    """
    return "int8"  # one answer for every kind measured so far; the CPU is the input so that can change


def int8_weights_for(requested: str, cpu: CpuInfo) -> Int8Weights:
    """The int8 weight form for a `--int8-weights` setting: `auto` is this CPU's exact form."""
    return cpu.int8_weights if requested == "auto" else requested  # type: ignore[return-value]
