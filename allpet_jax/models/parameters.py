"""Parameter counts of NNX modules, and the overview table printed at start-up (big_vision style)."""

from __future__ import annotations

import jax
from flax import nnx


def count_parameters(tree) -> int:
    """Number of scalars in a module's `nnx.Param` variables, or in a parameter state (any pytree of
    arrays, e.g. `Stage.params`)."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def parameter_overview(module: nnx.Module, depth: int = 1) -> str:
    """A table of parameter counts grouped by the first `depth` path components, with the total."""
    groups: dict[str, int] = {}
    for path, leaf in jax.tree.leaves_with_path(nnx.state(module, nnx.Param)):
        keys = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
        name = "/".join(keys[:depth])
        groups[name] = groups.get(name, 0) + leaf.size
    width = max([len(k) for k in groups] + [5])
    lines = [f"{'module':<{width}}  {'params':>12}", "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:>12,}" for k, v in groups.items()]
    lines += ["-" * (width + 14), f"{'total':<{width}}  {count_parameters(module):>12,}"]
    return "\n".join(lines)


def print_parameter_overview(module: nnx.Module, depth: int = 1) -> int:
    """Print `parameter_overview` under the module's class name; return the total count."""
    print(f"{type(module).__name__} parameters")
    print(parameter_overview(module, depth))
    return count_parameters(module)
