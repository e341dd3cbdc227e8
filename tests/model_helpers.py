"""Helpers shared by the model and loss tests: tiny model sizes, fast keys, fast compiles."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TINY_AE = dict(channels=(4, 8, 8), num_res_blocks=1, max_groups=4)


def rngs(seed=0):
    # "rbg" keys: XLA:CPU compiles each threefry initialiser ~10x slower, and a model has dozens of shapes.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def quick_jit(fn):
    """`jax.jit` at XLA:CPU backend optimisation level 0: these programs run once, and compile ~2.5x faster.
    NNX modules are pytrees, so they pass in and out as arguments (without in-place updates)."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def random_trained_stage(name="foundation"):
    """A freshly initialised smoke stage as `runs.load_trained` would return it, its parameters perturbed so
    that none is at its initial value (random weights: for tests of what carries or transforms them)."""
    from allpet_jax.training import runs
    from allpet_jax.training import step as train_step
    from configs import base

    cfg = runs.stage_config(base.get_config("smoke"), name)
    meta = dict(runs.stage_meta(cfg, name), normalisation={"source_scale": 2.0, "target_scale": 3.0},
                channels={"target": 1, "source": 1})
    stage = runs.build_trained_stage(cfg, meta)
    rng = np.random.default_rng(1)  # numpy: a jax.random draw per leaf shape would compile for each
    params = jax.tree.map(lambda x: np.asarray(x) + (0.01 * rng.normal(size=x.shape)).astype(x.dtype)
                          if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x), stage.params)  # not an init
    state = train_step.TrainState(jnp.int32(7), params, None, params, jnp.zeros((2,), jnp.uint32), stage.frozen)
    return runs.TrainedStage(name, cfg, meta, stage, state, 7, "/nowhere")
