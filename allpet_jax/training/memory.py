"""Choosing the micro-batch from a memory budget, using XLA's analysis of the compiled step.

The estimate of a compiled step is `arguments + outputs + temporaries` from
`compiled.memory_analysis()` (per device). Candidates are the divisors of the per-device batch, tried
from the largest micro-batch down; the first that fits is used. Nothing is run, only compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    micro_batch: int
    n_micro: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    flops: float | None

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes

    def describe(self) -> str:
        flops = f", {self.flops / 1e9:.1f} GFLOP/step" if self.flops else ""
        mib = 2**20
        return (
            f"micro-batch {self.micro_batch} x {self.n_micro} per device: "
            f"{self.total_bytes / mib:.1f} MiB (arguments {self.argument_bytes / mib:.1f}, "
            f"outputs {self.output_bytes / mib:.1f}, temporaries {self.temp_bytes / mib:.1f}){flops}"
        )


def estimate(compiled, micro_batch: int, n_micro: int) -> MemoryEstimate:
    mem = compiled.memory_analysis()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is optional on some backends; memory is what we need
        flops = None
    return MemoryEstimate(
        micro_batch=micro_batch,
        n_micro=n_micro,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        flops=flops,
    )


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_micro_batch(
    compile_step: Callable[[int], "jax.stages.Compiled"],
    per_device_batch: int,
    budget_gb: float | None,
) -> tuple[int, MemoryEstimate]:
    """The number of micro-batches whose compiled step fits `budget_gb` (largest micro-batch first).

    `compile_step(n_micro)` must return the compiled step for that split. With no budget the whole
    per-device batch is one micro-batch. Raises `ValueError` if even micro-batch 1 does not fit.
    """
    if budget_gb is None or budget_gb <= 0:
        return 1, estimate(compile_step(1), per_device_batch, 1)
    budget = budget_gb * 2**30
    tried = []
    for micro_batch in divisors_descending(per_device_batch):
        n_micro = per_device_batch // micro_batch
        est = estimate(compile_step(n_micro), micro_batch, n_micro)
        tried.append(est)
        if est.total_bytes <= budget:
            return n_micro, est
    smallest = tried[-1]
    raise ValueError(
        f"memory_budget_gb={budget_gb} is too small: even micro-batch 1 needs an estimated "
        f"{smallest.total_bytes / 2**30:.3f} GiB per device ({smallest.describe()}). "
        "Raise the budget, or shrink the model (channels, levels) or the sinogram size."
    )
