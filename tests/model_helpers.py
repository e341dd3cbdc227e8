"""Helpers shared by the model and loss tests: tiny model sizes, fast keys, fast compiles."""

import jax
from flax import nnx

TINY_AE = dict(channels=(4, 8, 8), num_res_blocks=1, max_groups=4)


def rngs(seed=0):
    # "rbg" keys: XLA:CPU compiles each threefry initialiser ~10x slower, and a model has dozens of shapes.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def quick_jit(fn):
    """`jax.jit` at XLA:CPU backend optimisation level 0: these programs run once, and compile ~2.5x faster.
    NNX modules are pytrees, so they pass in and out as arguments (without in-place updates)."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})
