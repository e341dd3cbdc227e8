"""FLOPs and memory of a compiled step, read from XLA's own analysis of the compiled program.

Used to size micro-batches against a memory budget and to report what a train step costs. The numbers
are XLA's estimates for the backend it compiled for: `flops` counts a multiply-add as two, and a loop
body (`lax.scan`, `fori_loop`) is counted once, not once per iteration.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class CompiledCost:
    flops: float  # floating-point operations of one call
    bytes_accessed: float  # memory traffic XLA estimates for one call
    argument_bytes: int
    output_bytes: int
    temp_bytes: int  # scratch buffers (activations kept for the backward pass live here)
    alias_bytes: int  # outputs that reuse argument buffers (donation), counted once

    @property
    def total_bytes(self) -> int:
        """Device memory the call needs: arguments + outputs + temporaries, less donated aliases."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def summary(self) -> str:
        mib = 2.0**20
        return (
            f"{self.flops / 1e9:.2f} GFLOP, memory {self.total_bytes / mib:.1f} MiB "
            f"(arguments {self.argument_bytes / mib:.1f}, outputs {self.output_bytes / mib:.1f}, "
            f"temporaries {self.temp_bytes / mib:.1f}, aliased {self.alias_bytes / mib:.1f})"
        )


def compiled_cost(fn, *args, **kwargs) -> CompiledCost:
    """Compile `fn(*args, **kwargs)` (a `jax.jit` function, or any function, which is jitted here) without
    running it and return XLA's cost and memory analysis."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args, **kwargs).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device program
        cost = cost[0] if cost else {}
    cost = cost or {}
    mem = compiled.memory_analysis()
    get = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0  # noqa: E731
    return CompiledCost(
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        argument_bytes=get("argument_size_in_bytes"),
        output_bytes=get("output_size_in_bytes"),
        temp_bytes=get("temp_size_in_bytes"),
        alias_bytes=get("alias_size_in_bytes"),
    )
