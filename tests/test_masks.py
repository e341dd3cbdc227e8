"""allpet_jax.masks (RMAS + DMM): exact view split, mask shapes, DMM distributions, sample counting."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import radon
from allpet_jax import masks

GEOM = radon.Geometry.square(48, 32, pixel_size=2.0, bin_spacing=2.0)
CONFIG = masks.MaskConfig(grid=6, max_cells=5)  # most tests share it (and its compiled step)


@functools.lru_cache(maxsize=1)
def _batch():
    """8 samples of 2 channels; the sinogram is noisy, so S != R(x)."""
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(8, 2) + GEOM.image_shape).astype(np.float32)
    clean = np.asarray(radon.forward(image, GEOM))
    noisy = rng.poisson(5.0 * clean).astype(np.float32)
    return {"target": jnp.asarray(noisy), "image": jnp.asarray(image), "index": jnp.arange(8)}


def test_mask_mode_views_add_up_exactly():
    batch = _batch()
    out = masks.make_rmas(GEOM, CONFIG)(jax.random.key(0), batch)
    assert np.array_equal(np.asarray(out["positive"] + out["negative"]), np.asarray(batch["target"]))
    assert np.array_equal(np.asarray(out["full"]), np.asarray(batch["target"]))
    m = np.asarray(out["sino_mask"])[:, None]
    assert np.array_equal(np.asarray(out["positive"]), m * np.asarray(batch["target"]))
    assert 0 < m.mean() < 1


def test_split_mode_views_add_up_exactly_and_full_is_radon_of_image():
    batch = _batch()
    out = masks.make_rmas(GEOM, dataclasses.replace(CONFIG, mode="split"))(jax.random.key(0), batch)
    assert np.array_equal(np.asarray(out["positive"] + out["negative"]), np.asarray(out["full"]))
    clean = np.asarray(radon.forward(batch["image"], GEOM))
    np.testing.assert_allclose(out["full"], clean, rtol=0, atol=2e-5 * clean.max())
    # P is the projection of the masked image: zero on rays that miss the mask.
    miss = np.asarray(radon.forward(out["image_mask"], GEOM))[:, None] <= 0
    assert np.all(np.asarray(out["positive"])[np.broadcast_to(miss, clean.shape)] == 0)
    np.testing.assert_array_equal(batch["target"], _batch()["target"])  # measured sinogram untouched


def test_masks_are_binary_with_the_right_shapes_and_cell_counts():
    out = masks.make_rmas(GEOM, CONFIG)(jax.random.key(3), _batch())
    im, sm, k = (np.asarray(out[key]) for key in ("image_mask", "sino_mask", "n_cells"))
    assert im.shape == (8,) + GEOM.image_shape and sm.shape == (8,) + GEOM.sino_shape and k.shape == (8,)
    assert im.dtype == sm.dtype == np.float32 and k.dtype == np.int32
    assert set(np.unique(im)) <= {0.0, 1.0} and set(np.unique(sm)) <= {0.0, 1.0}
    cell_pixels = (48 // 6) ** 2
    np.testing.assert_array_equal(im.sum(axis=(1, 2)), k * cell_pixels)
    assert np.all((1 <= k) & (k <= 5)) and len(set(k.tolist())) > 1
    # Each mask is a union of whole cells: constant on every cell.
    cells = masks.cell_index(GEOM, 6)
    for m in im:
        for c in range(36):
            assert np.ptp(m[cells == c]) == 0


def test_sinogram_mask_is_thresholded_projection_of_image_mask():
    out = masks.make_rmas(GEOM, CONFIG)(jax.random.key(5), _batch())
    direct = np.asarray(radon.forward(out["image_mask"], GEOM)) > CONFIG.tau_mm
    disagree = np.mean(direct != (np.asarray(out["sino_mask"]) > 0))
    assert disagree <= 1e-4  # only float rounding right at tau can differ


def test_single_cell_sinogram_mask_follows_the_cells_sinusoid():
    geom = radon.Geometry((48, 48), 32, 70, pixel_size=2.0, bin_spacing=2.0)  # detector covers the corners
    config = masks.MaskConfig(grid=4, count="fixed", n_cells=1)
    batch = {"target": jnp.ones((6, 1) + geom.sino_shape), "index": jnp.arange(6)}
    out = masks.make_rmas(geom, config)(jax.random.key(7), batch)
    cells = masks.cell_index(geom, 4)
    theta, s = geom.theta, geom.s_mm
    for m, sm in zip(np.asarray(out["image_mask"]), np.asarray(out["sino_mask"])):
        (c,) = np.unique(cells[m > 0])
        rows, cols = np.nonzero(cells == c)
        x0, y0 = geom.x_mm[cols].mean(), geom.y_mm[rows].mean()
        centre = x0 * np.cos(theta) + y0 * np.sin(theta)
        masked_centre = (sm * s).sum(axis=1) / sm.sum(axis=1)
        np.testing.assert_allclose(masked_centre, centre, atol=geom.bin_spacing)


@pytest.mark.parametrize("count,kw", [("fixed", dict(n_cells=7)), ("uniform", dict(max_cells=9)), ("poisson", dict(mean_cells=2.5))])
def test_dmm_count_distribution_matches_its_parameters(count, kw):
    config = masks.MaskConfig(grid=4, count=count, **kw)
    n = 4000
    k = np.asarray(masks.draw_many(jax.random.split(jax.random.key(11), n), config)[1])
    if count == "fixed":
        assert np.all(k == 7)
        return
    if count == "uniform":
        support = np.arange(1, 10)
        expected = np.full(9, n / 9)
    else:  # Poisson(2.5) clipped to [1, 16]: P(k=1) = P(0) + P(1); tail >= 7 pooled (expected counts >= 5)
        pmf = stats.poisson.pmf(np.arange(17), 2.5)
        probs = np.concatenate([[pmf[0] + pmf[1]], pmf[2:7], [1 - pmf[:7].sum()]])
        expected = n * probs
        support = np.arange(1, 8)
        assert k.min() >= 1
        k = np.minimum(k, 7)
    observed = np.array([np.sum(k == v) for v in support])
    assert observed.sum() == n
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def _mean_pairwise_distance(cells, grid):
    r, c = np.divmod(np.nonzero(cells)[0], grid)
    d = np.hypot(r[:, None] - r[None], c[:, None] - c[None])
    return d.sum() / (len(r) * (len(r) - 1))


def test_clustered_layout_puts_cells_closer_together_than_uniform():
    keys = jax.random.split(jax.random.key(4), 300)
    spread = {}
    for layout in ("uniform", "clustered"):
        config = masks.MaskConfig(grid=8, count="fixed", n_cells=4, layout=layout, cluster_sigma_cells=1.0)
        cells, _ = masks.draw_many(keys, config)
        spread[layout] = np.mean([_mean_pairwise_distance(c, 8) for c in np.asarray(cells)])
    # Uniform: about 0.52 * 8 = 4.2 cells apart on average; clustered with sigma 1 cell: under 2.
    assert spread["uniform"] > 3.5 and spread["clustered"] < 2.0


def test_activity_layout_draws_the_active_cells_first():
    grid = 4
    activity = np.zeros(grid * grid, np.float32)
    activity[[1, 6, 11]] = [1.0, 2.0, 0.5]  # three active cells
    config = masks.MaskConfig(grid=grid, count="uniform", max_cells=3, layout="activity")
    cells, k = masks.draw_many(jax.random.split(jax.random.key(9), 6000), config, jnp.tile(activity, (6000, 1)))
    cells, k = np.asarray(cells), np.asarray(k)
    assert np.all(cells[:, [0, 2, 3, 4, 5, 7, 8, 9, 10, 12, 13, 14, 15]] == 0)  # k <= 3: only active cells
    # One cell at a time follows the weights: P(cell 6) = 2 / 3.5.
    frac = cells[k == 1].mean(axis=0)
    np.testing.assert_allclose(frac[[1, 6, 11]], np.array([1.0, 2.0, 0.5]) / 3.5, atol=0.03)


def test_activity_layout_from_fbp_prefers_the_hot_quadrant():
    image = np.zeros((4, 1) + GEOM.image_shape, np.float32)
    image[:, :, :24, 24:] = 1.0  # top-right quadrant active = cells (0..1, 2..3) of a 4 x 4 grid
    batch = {"target": radon.forward(jnp.asarray(image), GEOM), "index": jnp.arange(4)}
    config = masks.MaskConfig(grid=4, count="fixed", n_cells=2, layout="activity", activity_power=2.0)
    out = masks.make_rmas(GEOM, config)(jax.random.key(1), batch)
    assert np.all(np.asarray(out["image_mask"])[:, :24, 24:].sum(axis=(1, 2)) == 2 * 144)


def test_index_arithmetic_and_source_wrapper():
    assert masks.split_index(0, 400) == (0, 0)
    assert masks.split_index(199_999, 400) == (499, 399)
    idx = np.arange(200_000)
    base, seed = masks.split_index(idx, 400)
    assert base.max() == 499 and seed.max() == 399
    assert len(set(zip(base.tolist(), seed.tolist()))) == 200_000  # every (sinogram, seed) pair once

    class Base:
        def __len__(self):
            return 500

        def __getitem__(self, i):
            return {"target": np.full((1, 2, 2), float(i), np.float32), "index": np.int64(i)}

    source = masks.RmasSource(Base(), 400)
    assert len(source) == 200_000
    record = source[123_456]
    assert int(record["index"]) == 308 and int(record["mask_seed"]) == 256 and record["target"][0, 0, 0] == 308
    with pytest.raises(IndexError):
        source[200_000]


def test_masks_depend_on_the_sample_only_and_are_distinct():
    config = masks.MaskConfig(grid=8, count="uniform", max_cells=6)
    rmas = masks.make_rmas(GEOM, config)
    sino = jnp.zeros((256, 1) + GEOM.sino_shape)

    def image_masks(base, seed):
        out = rmas(jax.random.key(0), {"target": sino, "index": jnp.asarray(base), "mask_seed": jnp.asarray(seed)})
        return np.asarray(out["image_mask"]) > 0

    rng = np.random.default_rng(0)
    samples = rng.choice(500 * 400, size=256, replace=False)
    base, seed = masks.split_index(samples, 400)
    drawn = image_masks(base, seed)
    # The same samples in another order (another batch) give the same masks.
    perm = rng.permutation(256)
    np.testing.assert_array_equal(image_masks(base[perm], seed[perm]), drawn[perm])
    # Distinct samples draw distinct masks up to the collisions the DMM support allows: the 1/6 of draws
    # with k = 1 share 64 single-cell masks (expected distinct fraction ~0.94 here).
    assert len({m.tobytes() for m in drawn}) / 256 >= 0.9
    # One sinogram's seeds 0..255: same count of collisions, and only among small k.
    one = image_masks(np.zeros(256, np.int32), np.arange(256))
    distinct = {m.tobytes() for m in one}
    assert 0.85 <= len(distinct) / 256 < 1.0


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="count must be one of"):
        masks.MaskConfig(count="gaussian")
    with pytest.raises(ValueError, match=r"max_cells must be an integer in \[1, grid\^2 = 16\]"):
        masks.MaskConfig(grid=4, max_cells=17)
    with pytest.raises(ValueError, match="unknown key"):
        masks.MaskConfig.from_config({"grid": 4, "layuot": "uniform"})
    assert masks.MaskConfig.from_config({"enabled": True, "grid": 4}).grid == 4
    rmas = masks.make_rmas(GEOM, masks.MaskConfig(mode="split"))
    with pytest.raises(ValueError, match=r"needs batch\['image'\]"):
        rmas(jax.random.key(0), {"target": jnp.zeros((2, 1) + GEOM.sino_shape)})


def _tiny_simulate(key, task, geom):
    """Stand-in for `simulate_pair` (same output contract): a random disc, noisy source and target."""
    k1, k2, k3 = jax.random.split(key, 3)
    H, W = geom.image_shape
    y, x = jnp.meshgrid(jnp.linspace(-1, 1, H), jnp.linspace(-1, 1, W), indexing="ij")
    c = jax.random.uniform(k1, (3,), minval=jnp.array([-0.3, -0.3, 0.2]), maxval=jnp.array([0.3, 0.3, 0.6]))
    image = 5.0 * ((x - c[0]) ** 2 + (y - c[1]) ** 2 < c[2] ** 2).astype(jnp.float32)[None]
    clean = radon.forward(image, geom)
    return {
        "source": jax.random.poisson(k2, 0.25 * clean).astype(jnp.float32),
        "target": jax.random.poisson(k3, clean).astype(jnp.float32),
        "image": image,
        "labels": (image[0] > 0).astype(jnp.int32),
    }


def test_config_and_grain_pipeline_hook():
    from allpet_jax.data import pipeline

    config = _base_config("smoke")
    assert masks.MaskConfig.from_config(config.masks) == masks.MaskConfig()  # config mirrors the defaults
    config.masks.enabled = True
    config.masks.masks_per_sinogram = 5
    norm = pipeline.Normalisation(1.0, 1.0)
    data = config.data

    def first_batches(n):
        dataset, _ = pipeline.pipeline_from_config(data, "train", normalisation=norm, simulate=_tiny_simulate, masks=config.masks)
        it = iter(dataset)
        return [next(it) for _ in range(n)]

    b = first_batches(1)[0]
    geom = pipeline.geometry_from_config(data)
    assert b["positive"].shape == b["target"].shape and b["image_mask"].shape == (data.batch_size,) + geom.image_shape
    assert isinstance(b["positive"], np.ndarray)
    np.testing.assert_array_equal(b["positive"] + b["negative"], b["target"])
    assert set(b["mask_seed"].tolist()) <= set(range(5)) and b["sample_index"].max() < data.n_train * 5
    np.testing.assert_array_equal(b["sample_index"] // 5, b["index"])
    # The source grows by K on the train split only.
    src = pipeline.make_source(data, "train", simulate=_tiny_simulate)
    wrapped, transforms = pipeline.rmas_hook(config.masks, data, "train", src)
    assert len(wrapped) == 5 * len(src) and isinstance(transforms[0], masks.RmasTransform)
    val, _ = pipeline.rmas_hook(config.masks, data, "val", src)
    assert val is src
    config.masks.enabled = False
    assert pipeline.rmas_hook(config.masks, data, "train", src) == (src, ())


def _base_config(preset):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("base_config", os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def test_two_masks_of_one_sinogram_get_their_own_step_and_noise():
    """Under RMAS the pipeline's `index` is the base sinogram's; the train step keys records by
    `sample_index` (`step.record_index`), so two mask seeds of one sinogram draw different `t` and noise."""
    from allpet_jax import losses
    from allpet_jax.diffusion import linear_schedule
    from allpet_jax.training import step

    class Base:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"target": np.full((1, 2, 2), float(i), np.float32), "index": np.int64(i)}

    batch = masks.RmasSource(Base(), 400).read_batch([801, 802, 5])  # two seeds of sinogram 2, one of 0
    assert batch["index"].tolist() == [2, 2, 0]
    index = step.record_index(batch)
    assert index.dtype == np.int32 and index.tolist() == [801, 802, 5]
    keys = step.sample_keys(jax.random.key_data(jax.random.key(0)), jnp.asarray(7), jnp.asarray(index))
    t, noise = losses.draw_steps_and_noise(keys, linear_schedule(1000), 3, (4, 4))
    assert int(t[0]) != int(t[1]) and float(jnp.abs(noise[0] - noise[1]).max()) > 0.1
    assert step.record_index({"index": np.arange(3)}).tolist() == [0, 1, 2]  # without RMAS: the sample
