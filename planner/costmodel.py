"""Operator times from FLOPs and bytes moved: a roofline with efficiency factors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Roofline:
    """A device's sustained rates: FLOP/s for math, bytes/s for memory traffic and host copies."""

    flops_per_s: float
    bytes_per_s: float
    host_bytes_per_s: float
    efficiency: float = 0.6  # share of peak a real kernel reaches

    def op_ms(self, flops: int, bytes_moved: int) -> float:
        """Time of one operator in ms: the slower of its math and its memory traffic."""
        seconds = max(flops / self.flops_per_s, bytes_moved / self.bytes_per_s) / self.efficiency
        return seconds * 1e3

    def copy_ms(self, nbytes: int) -> float:
        """Time in ms to move `nbytes` between device and host memory."""
        return nbytes / self.host_bytes_per_s * 1e3


# A mid-range data-centre GPU (A100-class dense BF16/TF32, HBM2e, PCIe 4 x16),
# used for times when the profile was taken without running anything.
REFERENCE = Roofline(flops_per_s=150e12, bytes_per_s=1.5e12, host_bytes_per_s=24e9)
