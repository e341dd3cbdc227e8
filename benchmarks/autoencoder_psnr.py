"""Reconstruction quality of the sinogram autoencoder after a short training run, on held-out sinograms.

    python benchmarks/autoencoder_psnr.py [--factor 4] [--steps 600] [--noise none|poisson] [--minutes 9]

Trains `SinogramAutoencoder` briefly on simulated sinograms and prints a table of held-out PSNR (and
the linear patch-PCA baseline with the same latent size, fitted on the training set, measured in the
same run). Data: `allpet_jax.data.simulate.simulate_pair` ("synthesis" task: brain and body phantoms
with lesions, clinical count levels; its noise-free `target_clean`, or the Poisson-noisy corrected
`target` with `--noise poisson`; `--counts` is then unused), or with `--data ellipses` random-ellipse
phantoms projected with `radon.forward` (Poisson noise at `--counts` total counts per sinogram).
Sinograms are divided by one dataset constant, the 99.5th percentile of the training values, as the
data pipeline does. PSNR is `10 log10(max(x)^2 / mean((x - x_hat)^2))` per held-out sinogram (peak =
that sinogram's maximum), averaged in dB; noisy inputs are compared with the *noisy* sinogram they
encode (the autoencoder's job is to reproduce its input, not to denoise); for noisy data the script also
prints the PSNR of the reconstruction and of the noisy input against the noise-free sinograms.
Nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import radon
from allpet_jax import losses
from allpet_jax.models import SinogramAutoencoder, count_parameters


def random_ellipse_images(key, n: int, size: int, max_ellipses: int = 8):
    """`(n, size, size)` images: a body ellipse with 2..max_ellipses inner hot/cold ellipses, densities > 0."""
    ks = jax.random.split(key, 6)
    yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, size), jnp.linspace(-1, 1, size), indexing="ij")
    m = max_ellipses
    c = jax.random.uniform(ks[0], (n, m, 2), minval=-0.45, maxval=0.45)
    ax = jax.random.uniform(ks[1], (n, m, 2), minval=0.05, maxval=0.3)
    phi = jax.random.uniform(ks[2], (n, m), maxval=np.pi)
    rho = jax.random.uniform(ks[3], (n, m), minval=-0.5, maxval=2.0)
    active = jnp.arange(m)[None] < jax.random.randint(ks[4], (n, 1), 2, m + 1)
    body_ax = jax.random.uniform(ks[5], (n, 2), minval=0.6, maxval=0.85)

    def inside(cx, cy, a, b, ph):
        u = (xx - cx) * jnp.cos(ph) + (yy - cy) * jnp.sin(ph)
        v = -(xx - cx) * jnp.sin(ph) + (yy - cy) * jnp.cos(ph)
        return ((u / a) ** 2 + (v / b) ** 2 <= 1.0).astype(jnp.float32)

    def one(c, ax, phi, rho, active, body_ax):
        body = inside(0.0, 0.0, body_ax[0], body_ax[1], 0.0)
        blobs = jax.vmap(inside)(c[:, 0], c[:, 1], ax[:, 0], ax[:, 1], phi)
        img = body + jnp.sum((rho * active)[:, None, None] * blobs, axis=0) * body
        return jnp.maximum(img, 0.0)

    return jax.vmap(one)(c, ax, phi, rho, active, body_ax)


def make_data(key, n: int, geom: radon.Geometry, noise: str, counts: float, data: str):
    """`(sinograms, noise-free sinograms, name)`, each `(n, 1, n_angles, n_bins)` float32."""
    if data == "simulate":
        from allpet_jax.data.simulate import simulate_pair

        field = "target_clean" if noise == "none" else "target"

        def pair(k):
            sample = simulate_pair(k, "synthesis", geom)
            return sample[field], sample["target_clean"]

        batch = jax.jit(jax.vmap(pair))
        keys = jax.random.split(key, n)
        chunks = [batch(keys[i:i + 32]) for i in range(0, n, 32)]
        sino, clean = (np.concatenate([np.asarray(c[j], np.float32) for c in chunks]) for j in (0, 1))
        return sino, clean, "simulate_pair('synthesis')"
    images = random_ellipse_images(key, n, geom.image_shape[0])
    clean = np.asarray(jax.jit(radon.forward, static_argnums=1)(images, geom))[:, None].astype(np.float32)
    sino = clean
    if noise == "poisson":
        rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
        scale = counts / clean.sum(axis=(1, 2, 3), keepdims=True)
        sino = (rng.poisson(clean * scale) / scale).astype(np.float32)
    return sino, clean, "ellipses"


def psnr_db(x, x_hat):
    """Mean over samples of `10 log10(max(x)^2 / MSE)`, `x` `(B, ...)`."""
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    axes = tuple(range(1, x.ndim))
    mse = np.mean((x - x_hat) ** 2, axis=axes)
    return float(np.mean(10 * np.log10(np.max(x, axis=axes) ** 2 / mse)))


def patch_pca_psnr(train, test, f: int, k: int):
    """The linear baseline: PCA of `f x f` patches keeping `k` components (fitted on `train`)."""
    def patches(s):
        B, C, A, N = s.shape
        return s.reshape(B, C, A // f, f, N // f, f).transpose(0, 2, 4, 1, 3, 5).reshape(-1, C * f * f)

    p = patches(train).astype(np.float64)
    mu = p.mean(0)
    basis = np.linalg.svd(p - mu, full_matrices=False)[2][:k]
    q = patches(test)
    r = (q - mu) @ basis.T @ basis + mu
    B, C, A, N = test.shape
    rec = r.reshape(B, A // f, N // f, C, f, f).transpose(0, 3, 1, 4, 2, 5).reshape(test.shape)
    return psnr_db(test, rec)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--factor", type=int, default=4)
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--channels", default="16,32,64")
    p.add_argument("--res-blocks", type=int, default=1)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--minutes", type=float, default=9.0, help="stop training after this wall time")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--loss", default="l2", choices=losses.RECONSTRUCTION_LOSSES)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--noise", default="none", choices=("none", "poisson"))
    p.add_argument("--counts", type=float, default=2e6, help="expected total counts per noisy sinogram")
    p.add_argument("--data", default="simulate", choices=("simulate", "ellipses"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    geom = radon.Geometry.square(args.size)
    k_train, k_test, k_init = jax.random.split(jax.random.key(args.seed), 3)
    t0 = time.perf_counter()
    train, _, source = make_data(k_train, args.train, geom, args.noise, args.counts, args.data)
    test, test_clean, _ = make_data(k_test, args.test, geom, args.noise, args.counts, args.data)
    scale = float(np.percentile(train, 99.5))
    train, test, test_clean = train / scale, test / scale, test_clean / scale
    print(f"data: {source}, {args.train} train / {args.test} held-out sinograms {test.shape[1:]}, noise={args.noise}, "
          f"made in {time.perf_counter() - t0:.1f} s")

    model = SinogramAutoencoder(
        in_channels=1, latent_channels=args.latent_channels, factor=args.factor,
        channels=tuple(int(c) for c in args.channels.split(",")), num_res_blocks=args.res_blocks,
        rngs=nnx.Rngs(jax.random.key(args.seed, impl="rbg")),  # rbg: initialisers compile ~10x faster on CPU
    )
    model.init_patch_pca(train[: min(64, len(train))])
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, args.steps // 10 + 1), args.steps, args.lr / 50)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    state, treedef = jax.tree.flatten(state)  # a flat list of arrays is cheaper to pass than an nnx.State

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, x, key):
        model, optimizer = nnx.merge(graphdef, jax.tree.unflatten(treedef, state))
        def loss_fn(m):
            return losses.autoencoder_loss(m, x, key, reconstruction=args.loss, kl_weight=args.kl_weight)

        (_, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return jax.tree.leaves(nnx.state((model, optimizer))), parts

    @jax.jit
    def reconstruct(state, x):
        model, _ = nnx.merge(graphdef, jax.tree.unflatten(treedef, state))
        return model(x)[0]

    def reconstruct_test(state):
        return np.concatenate([np.asarray(reconstruct(state, test[i:i + 16])) for i in range(0, len(test), 16)])

    def evaluate(state):
        return psnr_db(test, reconstruct_test(state))

    print(f"held-out PSNR after the PCA initialisation: {evaluate(state):.2f} dB")
    rng = np.random.default_rng(args.seed)
    t_train = time.perf_counter()
    step = 0
    for step in range(1, args.steps + 1):
        x = jnp.asarray(train[rng.integers(0, len(train), args.batch)])
        state, parts = train_step(state, x, jax.random.fold_in(k_init, step))
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  loss {float(parts['total']):.5f}  held-out PSNR {evaluate(state):6.2f} dB  "
                  f"({time.perf_counter() - t_train:.0f} s)", flush=True)
        if time.perf_counter() - t_train > 60 * args.minutes:
            break
    train_s = time.perf_counter() - t_train
    final = evaluate(state)
    pca = patch_pca_psnr(train, test, args.factor, args.latent_channels)
    model, _ = nnx.merge(graphdef, jax.tree.unflatten(treedef, state))

    print()
    print(f"| model | latent | params | train steps | train time | held-out PSNR |")
    print(f"|---|---|---|---|---|---|")
    lat = f"{args.size // args.factor}x{args.size // args.factor}x{args.latent_channels}"
    print(f"| SinogramAutoencoder f={args.factor} ({args.channels}) | {lat} | {count_parameters(model):,} | "
          f"{step} x {args.batch} | {train_s:.0f} s | {final:.2f} dB |")
    print(f"| patch PCA {args.factor}x{args.factor} -> {args.latent_channels} (linear baseline) | {lat} | - | - | - | "
          f"{pca:.2f} dB |")
    if args.noise != "none":
        vs_clean = psnr_db(test_clean, reconstruct_test(state))
        print(f"\nAgainst the noise-free sinograms: reconstruction {vs_clean:.2f} dB, the noisy input itself "
              f"{psnr_db(test_clean, test):.2f} dB (peak = the noise-free maximum).")


if __name__ == "__main__":
    main()
