"""Autoencoder, latent U-Net, their layers and the cost helpers: shapes on odd geometries, numbers against
independent references (nnx.GroupNorm, numpy patch PCA, hand counts)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from allpet_jax.diffusion import ddim, linear_schedule, nnx_denoiser
from allpet_jax.models import (
    LatentUNet,
    Prompt,
    SinogramAutoencoder,
    compiled_cost,
    condition_channel_count,
    condition_channels,
    count_parameters,
    parameter_overview,
    sinogram_map_to_latent,
)
from allpet_jax.models.layers import Conv, GroupNorm, Linear, depth_to_space, space_to_depth
from model_helpers import TINY_AE, quick_jit, rngs

TINY_UNET = dict(channels=(8, 16), num_res_blocks=1, attention_levels=(1,), num_heads=2, max_groups=4,
                 num_tracers=3, num_regions=4, num_tasks=6)


@pytest.mark.parametrize("factor,channels", [(4, (4, 8, 8)), (8, (4, 8, 8, 8))])
def test_autoencoder_shapes_odd_geometry(factor, channels):
    ae = quick_jit(lambda: SinogramAutoencoder(in_channels=2, latent_channels=3, factor=factor, channels=channels,
                                               max_groups=4, rngs=rngs(0)))()
    x = jax.random.uniform(jax.random.key(0), (2, 2, 96, 128))
    recon, mean, logvar = quick_jit(lambda ae, x, key: ae(x, key))(ae, x, jax.random.key(1))
    assert recon.shape == x.shape
    assert mean.shape == logvar.shape == (2, 96 // factor, 128 // factor, 3)
    assert ae.latent_shape(96, 128) == (96 // factor, 128 // factor, 3)
    with pytest.raises(ValueError, match="divisible by the autoencoder's downsampling factor"):
        ae.encode(jnp.zeros((1, 2, 90, 128)))
    with pytest.raises(ValueError, match="factor must be 4 or 8"):
        SinogramAutoencoder(factor=2, rngs=rngs(0))


def test_untrained_autoencoder_is_the_patch_pca():
    """After `init_patch_pca` the AE reproduces numpy's whitened 4x4-patch PCA reconstruction."""
    rng = np.random.default_rng(0)
    # smooth data: random low-frequency sinusoid mixtures
    a, b = np.meshgrid(np.arange(96), np.arange(128), indexing="ij")
    x = np.stack([sum(rng.normal() * np.sin(rng.uniform(0.01, 0.2) * a + rng.uniform(0.01, 0.2) * b + rng.uniform(0, 6))
                      for _ in range(5)) for _ in range(8)])[:, None].astype(np.float32) + 3.0
    ae = quick_jit(lambda: SinogramAutoencoder(latent_channels=4, rngs=rngs(0), **TINY_AE))()
    ae.init_patch_pca(jnp.asarray(x))
    recon, mean, logvar = quick_jit(lambda ae, x: ae(x))(ae, jnp.asarray(x))
    patches = x.reshape(8, 24, 4, 32, 4).transpose(0, 1, 3, 2, 4).reshape(-1, 16).astype(np.float64)
    mu = patches.mean(0)
    _, s, vt = np.linalg.svd(patches - mu, full_matrices=False)
    ref = ((patches - mu) @ vt[:4].T @ vt[:4] + mu).reshape(8, 24, 32, 4, 4).transpose(0, 1, 3, 2, 4).reshape(x.shape)
    np.testing.assert_allclose(recon, ref, atol=2e-4)
    np.testing.assert_allclose(np.std(np.asarray(mean).reshape(-1, 4), axis=0), 1.0, rtol=1e-3)  # whitened
    np.testing.assert_allclose(logvar, -10.0)


def test_group_norm_matches_flax():
    x = jax.random.normal(jax.random.key(0), (3, 6, 5, 16)) * 2.0 + 1.0
    ours = GroupNorm(16, 4, rngs=rngs(0))
    ref = nnx.GroupNorm(16, 4, rngs=rngs(0))
    scale = jax.random.normal(jax.random.key(1), (16,))
    ours.scale[...] = scale
    ref.scale[...] = scale
    np.testing.assert_allclose(ours(x), ref(x), atol=1e-5)
    film = (jnp.full((3, 16), 0.5), jnp.full((3, 16), -1.0))
    np.testing.assert_allclose(ours(x, film), ref(x) * 1.5 - 1.0, atol=1e-5)


def test_group_norm_conv_and_linear_gradients_match_flax():
    """The hand-written VJPs (group_norm, add_bias) against autodiff of nnx.GroupNorm, nnx.Conv and nnx.Linear."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 4, 16)) * 2.0 + 1.0
    weight = jax.random.normal(jax.random.key(1), x.shape)
    film = (jax.random.normal(jax.random.key(2), (3, 16)) * 0.3, jax.random.normal(jax.random.key(3), (3, 16)))
    scale, bias = jax.random.normal(jax.random.key(4), (16,)), jax.random.normal(jax.random.key(5), (16,))

    def loss(norm, x, film):
        out = norm(x, film) if isinstance(norm, GroupNorm) else norm(x) * (1.0 + film[0][:, None, None]) + film[1][:, None, None]
        return jnp.sum(jnp.sin(out) * weight)

    grads = []
    for norm in (GroupNorm(16, 4, rngs=rngs(0)), nnx.GroupNorm(16, 4, epsilon=1e-6, rngs=rngs(0))):
        norm.scale[...], norm.bias[...] = scale, bias
        params = nnx.grad(lambda m: loss(m, x, film))(norm)
        grads.append([*jax.grad(lambda x, f, m=norm: loss(m, x, f), argnums=(0, 1))(x, film),
                      params["scale"][...], params["bias"][...]])
    for ours, ref in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
    convs = [cls(16, 8, (3, 3), rngs=rngs(0)) for cls in (Conv, nnx.Conv)]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), nnx.state(convs[0]), nnx.state(convs[1])))
    for conv in convs:
        conv.bias[...] = jnp.arange(8.0)
    conv_grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)) * weight[..., :8]))(conv) for conv in convs]
    for ours, ref in zip(jax.tree.leaves(conv_grads[0]), jax.tree.leaves(conv_grads[1])):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    tokens = x.reshape(3, 24, 16)
    linears = [cls(16, 8, rngs=rngs(0)) for cls in (Linear, nnx.Linear)]
    for linear in linears:
        linear.bias[...] = jnp.arange(8.0)
    np.testing.assert_allclose(linears[0](tokens), linears[1](tokens), rtol=1e-6, atol=1e-6)
    linear_grads = [nnx.grad(lambda m: jnp.sum(jnp.sin(m(tokens)) * tokens[..., :8]))(m) for m in linears]
    for ours, ref in zip(jax.tree.leaves(linear_grads[0]), jax.tree.leaves(linear_grads[1])):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_space_to_depth_round_trip():
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    y = space_to_depth(x, 4)
    assert y.shape == (2, 2, 3, 48)
    np.testing.assert_array_equal(y[0, 1, 2], x[0, 4:8, 8:12, :].reshape(-1))
    np.testing.assert_array_equal(depth_to_space(y, 4), x)


@pytest.fixture(scope="module")
def tiny_unet():
    return quick_jit(lambda: LatentUNet(latent_channels=4, cond_channels=condition_channel_count(4), rngs=rngs(0),
                                        **TINY_UNET))()


def perturbed(model):
    """The zero-initialised output layers make a new U-Net output zero; give every parameter some noise
    (in numpy: eager jnp ops would compile once per parameter shape)."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(9)
    leaves = [np.asarray(leaf) + np.float32(0.05) * rng.standard_normal(leaf.shape, np.float32) for leaf in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_unet_shapes_prompt_and_conditions_96x128(tiny_unet):
    unet = perturbed(tiny_unet)
    h, w = 24, 32  # 96 angles x 128 bins at factor 4
    x = jnp.tile(jax.random.normal(jax.random.key(0), (1, h, w, 4)), (5, 1, 1, 1))
    # One batch of five variants of one input (the network treats batch items independently, so one
    # compiled call checks them all): reference, null prompt, other geometry, no conditions, other time.
    t = jnp.array([10, 10, 10, 10, 60])
    ids = lambda *v: jnp.array(v)  # noqa: E731
    prompt = Prompt(ids(0, 3, 0, 0, 0), ids(1, 4, 1, 1, 1), ids(5, 6, 5, 5, 5),
                    jnp.array([[96.0, 128.0]] * 2 + [[128.0, 128.0]] + [[96.0, 128.0]] * 2))
    cond = condition_channels(5, (h, w), 4, source=x, mask=jnp.ones((5, 96, 128)))
    cond = cond.at[3].set(0.0)
    out = quick_jit(lambda m, x, t, p, c: m(x, t, prompt=p, cond=c))(unet, x, t, prompt, cond)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    for i in range(1, 5):  # each input matters
        assert float(jnp.max(jnp.abs(out[i] - out[0]))) > 1e-4
    null = unet.null_prompt(jnp.array([[96.0, 128.0]]))
    assert [int(i[0]) for i in null[:3]] == [3, 4, 6]
    with pytest.raises(ValueError, match="divisible by 2"):
        jax.eval_shape(lambda x: unet(x, t[:1]), jnp.zeros((1, 25, 32, 4)))


def test_new_unet_outputs_zero_and_samples_through_nnx_denoiser(tiny_unet):
    unet = tiny_unet
    schedule = linear_schedule(20)
    denoise_fn, params = nnx_denoiser(unet, prompt=unet.null_prompt(jnp.array([[32.0, 32.0]] * 2)))
    # A new U-Net predicts eps = 0 everywhere (zero-initialised output), so DDIM with eta = 0 only rescales:
    # x_s = sqrt(ab_s / ab_t) x_t at every step, x_T / sqrt(ab_{T-1}) in the end.
    x_T = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    out = ddim.ddim_sample(denoise_fn, params, jax.random.key(1), schedule, (2, 8, 8, 4), 5, x_T=x_T)
    np.testing.assert_allclose(out, x_T / jnp.sqrt(schedule.alpha_bar[-1]), rtol=1e-4)
    assert nnx_denoiser(unet)[0] == denoise_fn  # equal graph definitions: the sampler does not recompile


def test_parameter_count_by_hand(tiny_unet):
    lin = nnx.Linear(3, 4, rngs=rngs(0))
    assert count_parameters(lin) == 3 * 4 + 4
    assert count_parameters(nnx.state(lin, nnx.Param)) == 3 * 4 + 4  # a parameter state counts the same
    unet = tiny_unet
    # the three id tables: (n + 1) rows (one null) of emb = 4 * 8 features
    table = parameter_overview(unet)
    assert f"{(3 + 1) * 32:,}" in table and f"{count_parameters(unet):,}" in table.splitlines()[-1]
    assert count_parameters(unet.tracer_embed) == 4 * 32


def test_compiled_cost_of_a_matmul():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    cost = compiled_cost(lambda a, b: a @ b, a, b)
    assert cost.flops == pytest.approx(2 * 64 * 32 * 16, rel=0.05)
    assert cost.argument_bytes == 4 * (64 * 32 + 32 * 16)
    assert cost.output_bytes == 4 * 64 * 16
    assert cost.total_bytes >= cost.argument_bytes + cost.output_bytes


def test_sinogram_map_to_latent():
    m = jnp.arange(2 * 8 * 12, dtype=jnp.float32).reshape(2, 8, 12)
    out = sinogram_map_to_latent(m, (2, 3))
    assert out.shape == (2, 2, 3, 1)
    np.testing.assert_allclose(out[1, 1, 2, 0], np.asarray(m)[1, 4:8, 8:12].mean())
    assert sinogram_map_to_latent(m, (3, 5)).shape == (2, 3, 5, 1)  # non-divisible: resized
    c = condition_channels(2, (2, 3), 4, tma=m)
    assert c.shape == (2, 2, 3, 6)
    np.testing.assert_array_equal(c[..., :5], 0.0)
    # a number for the mask: every ray known (1.0), the same channel as a sinogram mask of ones
    np.testing.assert_array_equal(condition_channels(2, (2, 3), 4, mask=1.0),
                                  condition_channels(2, (2, 3), 4, mask=jnp.ones((2, 8, 12))))
    np.testing.assert_array_equal(condition_channels(2, (2, 3), 4, mask=1.0)[..., 4], 1.0)
