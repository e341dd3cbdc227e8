"""Training losses of the latent diffusion model: the autoencoder loss, the (TMA-weighted) denoising loss,
the RMAS positive/negative consistency term, masked completion, and the bridge and regression losses for
paired tasks.

Every loss is a pure function that returns `(total, parts)`, `parts` a dict of scalars for logging.
Models enter as closures built inside the train step (`predict(x_t, t) -> output`,
`decode(z) -> sinogram`), so these functions know nothing about how a network is stored or sharded.
Shapes: sinograms `(B, C, n_angles, n_bins)`; latents channels-last `(B, h, w, z)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from allpet_jax.diffusion import ddbm, schedules
from allpet_jax.diffusion.schedules import Schedule
from allpet_jax.models.conditioning import sinogram_map_to_latent

RECONSTRUCTION_LOSSES = ("l1", "l2")


def _per_sample_mean(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def gaussian_kl(mean, logvar):
    """Mean over elements of `KL(N(mean, exp(logvar)) || N(0, 1))`."""
    return 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)


def autoencoder_loss(model, sino, key, *, reconstruction: str = "l1", kl_weight: float = 1e-6,
                     image_weight: float = 0.0, geom=None, fbp_filter: str = "hann"):
    """Reconstruction + `kl_weight` KL + optional image-domain term for `SinogramAutoencoder`.

    All terms are means over elements, so weights do not depend on the sinogram size. The image term
    compares `radon.fbp` of reconstruction and input with the same `reconstruction` norm; it needs
    `geom` (a `radon.Geometry` of the sinogram) and costs one FBP of each per step.

    Args:
      sino: `(B, C, n_angles, n_bins)` sinograms, normalised to roughly unit scale.
      key: draws the latent from the posterior; None uses the posterior mean.
    """
    if reconstruction not in RECONSTRUCTION_LOSSES:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_LOSSES}; got {reconstruction!r}")
    norm = jnp.abs if reconstruction == "l1" else jnp.square
    recon, mean, logvar = model(sino, key)
    rec = jnp.mean(norm(recon - sino))
    kl = gaussian_kl(mean, logvar)
    total = rec + kl_weight * kl
    parts = {"reconstruction": rec, "kl": kl}
    if image_weight:
        if geom is None:
            raise ValueError("autoencoder_loss image_weight > 0 needs geom (the radon.Geometry of the sinograms)")
        from radon.fbp import fbp  # the image term is optional; keep the import where it is used

        image = jnp.mean(norm(fbp(recon, geom, filter=fbp_filter) - fbp(sino, geom, filter=fbp_filter)))
        total = total + image_weight * image
        parts["image"] = image
    parts["total"] = total
    return total, parts


def tma_latent_weight(tma_sino, latent_hw: tuple[int, int], alpha: float):
    """Per-latent-pixel loss weight `1 + alpha * A` `(B, h, w, 1)` from the TMA sinogram map `(B, n_angles,
    n_bins)` in [0, 1], average-pooled to the latent grid."""
    return 1.0 + alpha * sinogram_map_to_latent(tma_sino, latent_hw)


def weighted_mse(pred, target, weight=None):
    """`mean(weight * (pred - target)^2)`, per sample `(B,)`; `weight` broadcasts against `pred`."""
    err = jnp.square(pred - target)
    return _per_sample_mean(err if weight is None else weight * err)


def consistency_loss(decode, x0_pos, x0_neg, sino):
    """RMAS consistency `mean || D(x0_P) + D(x0_N) - S ||^2` per sample `(B,)`.

    Args:
      decode: latent `(B, h, w, z)` -> sinogram `(B, C, n_angles, n_bins)` (frozen decoder, latent
        scaling undone inside).
      x0_pos, x0_neg: clean-latent predictions for the positive `M * S` and negative `(1 - M) * S` views.
      sino: the full sinogram `S`.
    """
    decoded = decode(jnp.concatenate([x0_pos, x0_neg], axis=0))  # one decoder call for both views
    B = x0_pos.shape[0]
    return _per_sample_mean(jnp.square(decoded[:B] + decoded[B:] - sino))


def draw_steps_and_noise(key, schedule: Schedule, batch: int, noise_shape: tuple, dtype=jnp.float32):
    """Steps `t` `(batch,)` uniform in `0 .. T-1` and standard normal noise `(batch,) + noise_shape`.

    `key` is one key for the whole batch, or one key per sample `(batch,)`: then sample `b`'s step and
    noise depend only on its own key, so a batch split over devices or micro-batches draws the same
    numbers (the train step gives each sample a key from its global index).
    """
    if jnp.ndim(key) == 0:
        kt, kn = jax.random.split(key)
        return (jax.random.randint(kt, (batch,), 0, schedule.num_steps),
                jax.random.normal(kn, (batch,) + tuple(noise_shape), dtype))
    if key.shape != (batch,):
        raise ValueError(f"key must be one key or one per sample ({batch},); got shape {key.shape}")
    pairs = jax.vmap(jax.random.split)(key)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_steps))(pairs[:, 0])
    noise = jax.vmap(lambda k: jax.random.normal(k, tuple(noise_shape), dtype))(pairs[:, 1])
    return t, noise


def min_snr_weight(schedule: Schedule, t, parameterization: str, gamma: float):
    """Min-SNR-gamma loss weights `(B,)` at steps `t` (Hang et al., ICCV 2023): the loss counts as an
    x0-space MSE weighted by `min(SNR_t, gamma)`, so the nearly noise-free steps, whose x0 error an output
    loss multiplies by up to `SNR_t + 1`, no longer dominate it. For an output parameterised as `eps`,
    `x0` or `v` that is `min(SNR, gamma) / SNR`, `min(SNR, gamma)` or `min(SNR, gamma) / (SNR + 1)`."""
    ab = schedule.alpha_bar[jnp.asarray(t, jnp.int32)]
    snr = ab / (1.0 - ab)
    capped = jnp.minimum(snr, gamma)
    per = {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1.0)}
    if parameterization not in per:
        raise ValueError(f"parameterization must be one of {tuple(per)}; got {parameterization!r}")
    return per[parameterization]


def diffusion_loss(predict, key, schedule: Schedule, x0, *, parameterization: str = "eps", weight=None,
                   min_snr: float = 0.0):
    """Denoising loss of one batch of latents `x0` `(B, h, w, z)` at uniformly drawn steps.

    Args:
      predict: `(x_t, t) -> output` with `t` integer steps `(B,)`.
      key: one key, or one per sample `(B,)` (see `draw_steps_and_noise`).
      weight: per-latent-pixel weight broadcastable to `x0` (e.g. `tma_latent_weight`), or None.
      min_snr: > 0: each sample's loss weighted by `min_snr_weight` with this gamma.
    Returns:
      `(loss, parts)`.
    """
    t, noise = draw_steps_and_noise(key, schedule, x0.shape[0], x0.shape[1:], x0.dtype)
    out = predict(schedules.q_sample(schedule, x0, t, noise), t)
    per_sample = weighted_mse(out, schedules.training_target(schedule, parameterization, x0, t, noise), weight)
    if min_snr:
        per_sample = per_sample * min_snr_weight(schedule, t, parameterization, min_snr)
    loss = jnp.mean(per_sample)
    return loss, {"diffusion": loss, "total": loss}


def rmas_diffusion_loss(predict, key, schedule: Schedule, views, *, parameterization: str = "eps", weight=None,
                        decode=None, sino=None, consistency_weight: float = 0.0):
    """Denoising loss over the RMAS triplet, plus the positive/negative consistency term.

    The three views of each sinogram share one step `t` (so their clean-latent predictions are equally
    informed) and draw independent noise; `predict` sees them stacked as one batch of `3 B` in the order
    full, positive, negative, and must apply each view's conditioning (mask all-ones, `M`, `1 - M`) in
    that order.

    The consistency term `|| D(x0_P) + D(x0_N) - S ||^2` is weighted per sample by `alpha_bar_t`: at high
    noise the predictions are conditional means given different noisy inputs, whose decoded sum need
    not equal `S`, and the weight lets that case count little. It is off when `consistency_weight == 0`
    (then `decode` and `sino` are not needed).

    Args:
      key: one key, or one per sample `(B,)` (see `draw_steps_and_noise`).
      views: clean latents `(3, B, h, w, z)` of the full, positive and negative sinograms.
      weight: per-latent-pixel weight `(B, h, w, 1)` (TMA), shared by the views, or None.
      decode, sino: the frozen decoder and the full sinograms `(B, C, n_angles, n_bins)`.
    Returns:
      `(loss, parts)` with parts "diffusion", "consistency" (when on) and "total".
    """
    V, B = views.shape[:2]
    if V != 3:
        raise ValueError(f"rmas_diffusion_loss views must be stacked (full, positive, negative) on axis 0; got {V}")
    t, noise = draw_steps_and_noise(key, schedule, B, (V,) + views.shape[2:], views.dtype)
    t = jnp.tile(t, V)
    x0 = views.reshape((V * B,) + views.shape[2:])
    noise = jnp.moveaxis(noise, 1, 0).reshape(x0.shape)
    x_t = schedules.q_sample(schedule, x0, t, noise)
    out = predict(x_t, t)
    w = None if weight is None else jnp.tile(weight, (V,) + (1,) * (weight.ndim - 1))
    diff = jnp.mean(weighted_mse(out, schedules.training_target(schedule, parameterization, x0, t, noise), w))
    parts = {"diffusion": diff}
    total = diff
    if consistency_weight:
        if decode is None or sino is None:
            raise ValueError("rmas_diffusion_loss consistency_weight > 0 needs decode and sino")
        x0_hat, _ = schedules.to_x0_eps(schedule, parameterization, out, x_t, t)
        x0_hat = x0_hat.reshape(views.shape)
        per_sample = consistency_loss(decode, x0_hat[1], x0_hat[2], sino)
        cons = jnp.mean(schedule.alpha_bar[t[:B]] * per_sample)
        parts["consistency"] = cons
        total = total + consistency_weight * cons
    parts["total"] = total
    return total, parts


def completion_loss(predict, key, schedule: Schedule, x0, *, parameterization: str = "eps", decode=None, sino=None,
                    unseen=None, consistency_weight: float = 0.0):
    """Denoising loss of synthesis/masked-completion records, plus a decoded-prediction term on the rays
    the condition did not show.

    `predict` already carries each record's condition (a view of `S` and its ray mask, or nothing for a
    synthesis record); the target is always the full latent `x0`. The optional term

        alpha_bar_t * mean( unseen * (D(x0_hat) - S)^2 )

    supervises the decoded clean estimate in sinogram space where the model had to invent it (`unseen`
    = 1 - the view's ray mask; all ones for synthesis records). Unlike the triplet's `P + N = S`
    (`rmas_diffusion_loss`), which a perfect latent denoiser meets already, it adds what the latent MSE
    does not see: errors as the decoder renders them. `alpha_bar_t` lets high-noise steps, whose `x0_hat`
    is a conditional mean, count little. Its share of the total is reported as `consistency_share`.

    Args:
      x0: clean latents `(B, h, w, z)` of the full sinograms.
      key: one key, or one per sample `(B,)` (see `draw_steps_and_noise`).
      decode, sino, unseen: the frozen decoder, the full sinograms `(B, C, A, Bn)` and the unseen-ray
        weights `(B, A, Bn)`; needed when `consistency_weight > 0`.
    """
    t, noise = draw_steps_and_noise(key, schedule, x0.shape[0], x0.shape[1:], x0.dtype)
    x_t = schedules.q_sample(schedule, x0, t, noise)
    out = predict(x_t, t)
    diff = jnp.mean(weighted_mse(out, schedules.training_target(schedule, parameterization, x0, t, noise)))
    parts = {"diffusion": diff}
    total = diff
    if consistency_weight:
        if decode is None or sino is None or unseen is None:
            raise ValueError("completion_loss consistency_weight > 0 needs decode, sino and unseen")
        x0_hat, _ = schedules.to_x0_eps(schedule, parameterization, out, x_t, t)
        per_sample = _per_sample_mean(unseen[:, None] * jnp.square(decode(x0_hat) - sino))
        cons = jnp.mean(schedule.alpha_bar[t] * per_sample)
        total = total + consistency_weight * cons
        parts["consistency"] = cons
        parts["consistency_share"] = consistency_weight * cons / total
    parts["total"] = total
    return total, parts


def bridge_loss(predict, key, target, source, *, sigma: float = 1.0, weight=None):
    """x0-regression loss of a DDBM bridge denoiser (see `allpet_jax.diffusion.ddbm`).

    Args:
      predict: `(x_t, t_model) -> x0_hat`; the source reaches it as a condition channel.
      key: one key, or one per sample `(B,)`: then sample `b`'s time and noise depend only on its own key
        (as in `draw_steps_and_noise`).
      target, source: latents `(B, h, w, z)` of the task's target and source.
      weight: per-latent-pixel weight broadcastable to `target` (e.g. `tma_latent_weight`), or None.
    """
    if jnp.ndim(key) == 0:
        x_t, t_model = ddbm.bridge_training_input(key, target, source, sigma)
    else:
        x_t, t_model = jax.vmap(lambda k, a, b: ddbm.bridge_training_input(k, a[None], b[None], sigma))(
            key, target, source)
        x_t, t_model = x_t[:, 0], t_model[:, 0]
    loss = jnp.mean(weighted_mse(predict(x_t, t_model), target, weight))
    return loss, {"bridge": loss, "total": loss}


SINOGRAM_LOSSES = ("mse", "ramp")


def ramp_mse(err, axis: int = -1):
    """Per-sample `(B,)` mean squared sinogram error `err` as its image sees it: each view's error weighted
    in frequency along the bins (`axis`) by a ramp, `|k|`, normalised so that white noise keeps its MSE.

    By the Fourier slice theorem, the squared norm of an image is `int int |w| |P(w, theta)|^2 dw dtheta`
    of its projections' spectra: the ramp-weighted norm of a sinogram error is the norm of the image error
    that filtered backprojection makes of it. A plain sinogram MSE weighs every frequency alike, so it
    charges little for blur (low-frequency sinograms carry most of the energy) that costs the image much.
    The views are zero-padded to twice their length (a linear, not a circular, spectrum), and the DC term
    gets the first frequency's weight (a ramp gives it none, which would leave each view's total free).
    """
    n = err.shape[axis]
    length = 2 * n
    spectrum = jnp.fft.rfft(err, n=length, axis=axis)
    k = jnp.arange(length // 2 + 1)
    # each rfft bin stands for itself and its negative frequency, except DC and Nyquist
    multiplicity = jnp.where((k == 0) | (k == length // 2), 1.0, 2.0)
    w = jnp.maximum(k, 1).astype(jnp.float32)
    w = w / (jnp.sum(multiplicity * w) / length)  # mean 1 over the full spectrum
    shape = [1] * err.ndim
    shape[axis] = -1
    energy = (multiplicity * w).reshape(shape) * jnp.square(jnp.abs(spectrum)) / length  # Parseval
    return jnp.sum(energy.reshape(err.shape[0], -1), axis=1) / (err.size // err.shape[0])


def regression_loss(prediction, target, weight=None, sinogram_loss: str = "mse", bin_axis: int = -1):
    """Mean squared error of a deterministic regressor, `(loss, parts)` with parts "regression" and
    "total"; `weight` broadcasts against `prediction` (e.g. `tma_latent_weight`). `sinogram_loss="ramp"`
    (for a prediction in sinogram space, bins along `bin_axis`) weighs the error as its image sees it
    (`ramp_mse`; `weight` then scales the error before its spectrum is taken)."""
    if sinogram_loss not in SINOGRAM_LOSSES:
        raise ValueError(f"train.sinogram_loss must be one of {SINOGRAM_LOSSES}; got {sinogram_loss!r}")
    if sinogram_loss == "ramp":
        err = prediction - target
        loss = jnp.mean(ramp_mse(err if weight is None else jnp.sqrt(weight) * err, bin_axis))
    else:
        loss = jnp.mean(weighted_mse(prediction, target, weight))
    return loss, {"regression": loss, "total": loss}
