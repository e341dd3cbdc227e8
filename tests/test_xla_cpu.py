"""The XLA:CPU library choice (`allpet_jax.xla_cpu`): applied on import unless the user chose, and the same
U-Net numbers through XNNPACK as through XLA's defaults (a second implementation of every convolution)."""

import json
import os
import subprocess
import sys

import numpy as np

from allpet_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One forward and gradient of a small latent U-Net: printed as JSON with the process's XLA_FLAGS.
SCRIPT = """
import json, os
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from allpet_jax.models import LatentUNet, Prompt
model = LatentUNet(latent_channels=4, cond_channels=0, channels=(16, 32), num_res_blocks=1, attention_levels=(1,),
                   num_heads=2, max_groups=8, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
graphdef, params = nnx.split(model, nnx.Param)
leaves, treedef = jax.tree.flatten(params)
# The zero-initialised output layers would hide the convolutions behind them: every parameter is perturbed.
leaves = [v + 0.05 * np.random.default_rng(i).standard_normal(v.shape, np.float32) for i, v in enumerate(leaves)]
x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
ids = jnp.zeros((2,), jnp.int32)
prompt = Prompt(ids, ids, ids, jnp.full((2, 2), 64.0))

@jax.jit
def run(leaves):
    def loss(leaves):
        out = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(x, jnp.array([10, 500]), prompt=prompt)
        return jnp.mean(out ** 2), out
    return jax.value_and_grad(loss, has_aux=True)(leaves)

(value, out), grads = run(leaves)
g = np.concatenate([np.ravel(v) for v in grads])
out = np.ravel(out)
print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "loss": float(value), "out": out[::97].tolist(),
                  "grad": g[::101].tolist(), "grad_norm": float(np.linalg.norm(g))}))
"""


def _run(**env):
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ALLPET_XLA_DEFAULTS")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env=dict(clean, JAX_PLATFORMS="cpu", **env))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_apply_leaves_a_users_choice_and_the_opt_out_alone():
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE"}
    assert not xla_cpu.apply(user) and user["XLA_FLAGS"].endswith("ELTWISE")
    opt_out = {"ALLPET_XLA_DEFAULTS": "1"}
    assert not xla_cpu.apply(opt_out) and "XLA_FLAGS" not in opt_out


def test_unet_through_xnnpack_matches_xla_defaults():
    ours, defaults = _run(XLA_FLAGS="--xla_force_host_platform_device_count=1"), _run(ALLPET_XLA_DEFAULTS="1")
    # Applied on import, after the user's other flags; and not at all when opted out.
    assert ours["flags"] == " ".join(["--xla_force_host_platform_device_count=1", *xla_cpu.FLAGS])
    assert defaults["flags"] == ""
    assert ours["grad_norm"] > 1e-3  # the gradients pass through every convolution
    np.testing.assert_allclose(ours["loss"], defaults["loss"], rtol=1e-5)  # measured: 1e-6 of the maximum apart
    np.testing.assert_allclose(ours["out"], defaults["out"], rtol=1e-4, atol=1e-5 * np.max(np.abs(defaults["out"])))
    np.testing.assert_allclose(ours["grad"], defaults["grad"], rtol=1e-4,
                               atol=1e-5 * np.max(np.abs(defaults["grad"])))
