"""The machine's f32 and bf16 matmul peaks, re-measured through a run on a shared machine.

Other jobs share the cores, so one peak measurement can land in a slow minute and make later
figures exceed "100% of peak". :class:`Peaks` measures both peaks several times during a run
(call :meth:`Peaks.sample` between sections) and reports fractions of the best rate observed:
the conservative reading.
"""

from __future__ import annotations

import jax.numpy as jnp
from _common import matmul_peak


class Peaks:
    """Best observed dense matmul rates (GFLOP/s), float32 and bf16 operands."""

    def __init__(self) -> None:
        self.f32: list[float] = []
        self.bf16: list[float] = []
        self.sample()

    def sample(self) -> None:
        """Measures both peaks once more (a few seconds)."""
        self.f32.append(matmul_peak(jnp.float32))
        self.bf16.append(matmul_peak(jnp.bfloat16))

    @property
    def best32(self) -> float:
        return max(self.f32)

    @property
    def best16(self) -> float:
        return max(self.bf16)

    def line(self) -> str:
        """One line: every sample and the best, f32 and bf16."""
        f = "/".join(f"{v:.0f}" for v in self.f32)
        b = "/".join(f"{v:.0f}" for v in self.bf16)
        ratio = self.best16 / self.best32
        return (
            f"matmul peak samples (GFLOP/s): f32 {f}, bf16 {b}; percentages use the best: "
            f"f32 {self.best32:.0f}, bf16 {self.best16:.0f} (bf16/f32 {ratio:.2f})"
        )
