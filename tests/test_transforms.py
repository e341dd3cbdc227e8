"""training.transforms.TmaTransform and the per-sample physical geometry it segments in
(`pipeline.sample_geometry`, `simulate.physical_geometry`): TMA's lengths are true mm for every region,
image size and data source."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import radon
from allpet_jax import attention
from allpet_jax.data import phantoms, pipeline, simulate
from allpet_jax.training.transforms import TmaTransform, by_geometry
from configs import base

BRAIN, CHEST = phantoms.REGIONS.index("brain"), phantoms.REGIONS.index("chest")


def _config(size: int, pixel_mm: float, bin_mm: float | None = None, **data):
    """The smoke config at `size` pixels, angles and bins of `pixel_mm`/`bin_mm` (for the simulator a
    ratio only), `low_dose` task, with `data` overrides."""
    config = base.get_config("smoke")
    config.data.task = "low_dose"
    config.data.image_size = config.data.n_angles = config.data.n_bins = size
    config.data.pixel_size, config.data.bin_spacing = pixel_mm, bin_mm or pixel_mm
    for k, v in data.items():
        config.data[k] = v
    return config


def test_physical_geometry_by_hand():
    geom = radon.Geometry.square(32, 24, pixel_size=8.0, bin_spacing=6.0)
    brain = simulate.physical_geometry(geom, "brain")
    assert (brain.pixel_size, brain.bin_spacing) == (256 / 32, 6.0)  # 256 mm / 32 px; bins keep their 3:4 ratio
    body = simulate.physical_geometry(geom, "trunk")
    assert (body.pixel_size, body.bin_spacing) == (600 / 32, 600 / 32 * 0.75)
    assert body.image_shape == (32, 32) and body.n_angles == 24 and body.n_bins == 32
    assert simulate.physical_geometry(geom, None, fov_mm=320.0).pixel_size == 10.0
    with pytest.raises(ValueError, match="region must be one of"):
        simulate.physical_geometry(geom, "knee")


def test_sample_geometry_follows_the_data_source():
    data = _config(32, 8.0, 6.0).data
    assert pipeline.sample_geometry(data, BRAIN).pixel_size == 8.0
    assert pipeline.sample_geometry(data, CHEST).pixel_size == 600 / 32
    assert [g.pixel_size for g in pipeline.sample_geometries(data)] == [8.0, 600 / 32]  # brain, body
    data.simulation.region = "chest"
    assert pipeline.sample_geometries(data) == (pipeline.sample_geometry(data, CHEST),)
    data.source = "files"  # users' files: the configured sizes, whatever the prompt says
    assert pipeline.sample_geometry(data, BRAIN) == pipeline.geometry_from_config(data)
    assert pipeline.sample_geometries(data) == (pipeline.geometry_from_config(data),)
    data.source, data.simulation.region = "simulated", None
    with pytest.raises(ValueError, match="region id 4 is not an index"):
        pipeline.sample_geometry(data, len(phantoms.REGIONS))  # the null id
    with pytest.raises(ValueError, match="neither a region id"):
        pipeline.sample_geometry(data)


def test_by_geometry_pads_each_part_to_a_power_of_two_and_keeps_the_order():
    a, b = radon.Geometry.square(4, pixel_size=1.0), radon.Geometry.square(4, pixel_size=2.0)
    geoms = [a, b, b, a, b, b, b]
    x = np.arange(7.0)
    seen = []

    def fn(geom, rows, none):
        seen.append((geom.pixel_size, len(rows)))
        assert none is None
        return {"y": rows * geom.pixel_size, "z": np.stack([rows, rows], 1)}

    out = by_geometry(fn, geoms, x, None)
    assert seen == [(1.0, 2), (2.0, 7)]  # 5 rows of b pad to 8, capped at the batch of 7
    np.testing.assert_array_equal(out["y"], x * [1, 2, 2, 1, 2, 2, 2])
    np.testing.assert_array_equal(out["z"], np.stack([x, x], 1))


@pytest.fixture(scope="module")
def simulated():
    """Four simulated `low_dose` samples at 32 px (two brain, two body; bins 3/4 of a pixel) with their
    physics, read the way training reads them, and the config. One simulator compile (~20 s)."""
    config = _config(32, 8.0, 6.0, physics=True)
    batch = pipeline.make_source(config.data, "train").read_batch([0, 6, 1, 9])
    assert (batch["prompt"][:, 1] == BRAIN).tolist() == [False, True, False, True]  # both fields of view
    return config, batch


def test_sample_geometry_is_the_simulators_geometry_in_mm(simulated):
    """The simulator's attenuation factors are `exp(-R mu)` with `R` in physical mm: `R` on
    `sample_geometry` (pixel and bin spacing) must reproduce them."""
    config, batch = simulated
    for i, region in enumerate(batch["prompt"][:, 1]):
        geom = pipeline.sample_geometry(config.data, region)
        line_integrals = np.asarray(radon.forward(jnp.asarray(batch["mu"][i]), geom))
        np.testing.assert_allclose(np.exp(-line_integrals), batch["attenuation"][i], rtol=1e-4, atol=1e-6)


def test_tma_of_a_simulated_batch_uses_each_regions_pixel(simulated):
    """Brain samples are segmented with 256 mm / 32 px = 8 mm pixels and body ones with 600 / 32 mm
    (bins 3/4 of that), whatever `data.pixel_size` says (8 mm here, 16 mm in the smoke preset)."""
    config, batch = simulated
    config = config.copy_and_resolve_references()
    config.tma.enabled = True
    out = TmaTransform(config)(batch)
    brain = batch["prompt"][:, 1] == BRAIN
    for rows, fov_mm in ((brain, 256.0), (~brain, 600.0)):
        geom = radon.Geometry.square(32, pixel_size=fov_mm / 32, bin_spacing=0.75 * fov_mm / 32)
        with jax.default_device(jax.devices("cpu")[0]):  # called as the transform calls it: reuses its compile
            expected = attention.attention_maps(batch["source"][rows, 0], geom, attention.TmaConfig())["sino_attention"]
        np.testing.assert_allclose(out["tma"][rows], expected, atol=1e-5)
    assert out["tma"].shape == batch["source"][:, 0].shape and out["tma"].dtype == np.float32
    for rows in (brain, ~brain):  # not zeros against zeros: a sample of each part has attention
        assert out["tma"][rows].max() == pytest.approx(1.0)


def test_oracle_attention_is_the_projection_of_the_lesion_labels(simulated):
    """tma.map='oracle': each sample's map is R(lesion mask) / max in its own geometry, the mask being the
    pixels labelled lesion_hot or lesion_cold; a phantom without lesions gets no attention."""
    config, batch = simulated
    config = config.copy_and_resolve_references()
    config.tma.enabled, config.tma.map = True, "oracle"
    out = TmaTransform(config)(batch)
    lesion = (batch["labels"] == phantoms.LABEL_IDS["lesion_hot"]) | (batch["labels"] == phantoms.LABEL_IDS["lesion_cold"])
    assert lesion.any(axis=(1, 2)).any()  # not zeros against zeros
    for i, region in enumerate(batch["prompt"][:, 1]):
        geom = pipeline.sample_geometry(config.data, region)
        proj = np.asarray(radon.forward(jnp.asarray(lesion[i], jnp.float32), geom))
        expected = proj / proj.max() if lesion[i].any() else np.zeros_like(proj)
        np.testing.assert_allclose(out["tma"][i], np.clip(expected, 0, None), atol=1e-5)
    with pytest.raises(ValueError, match="lesion labels"):
        TmaTransform(config)({k: v for k, v in batch.items() if k != "labels"})
    config.data.source = "files"
    with pytest.raises(ValueError, match="carry none"):
        TmaTransform(config)


def test_clinician_rois_land_on_each_samples_mm(simulated):
    """A 40 mm circle ROI covers 80 pixels of a brain slice (8 mm pixels) and a 4 x 4 block of a body
    slice (18.75 mm): the edited map is `A_sino` of `max(A_img, circle)` in each sample's geometry."""
    config, batch = simulated
    config = config.copy_and_resolve_references()
    config.tma.rois = [{"op": "add", "shape": "circle", "center_mm": [0.0, 0.0], "radius_mm": 40.0}]
    transform = TmaTransform(config)
    out, maps = transform(batch), transform.image_maps(batch)
    brain = batch["prompt"][:, 1] == BRAIN
    for rows, fov_mm in ((brain, 256.0), (~brain, 600.0)):
        geom = radon.Geometry.square(32, pixel_size=fov_mm / 32, bin_spacing=0.75 * fov_mm / 32)
        circle = np.hypot(*np.meshgrid(geom.x_mm, geom.y_mm)) <= 40.0
        expected = attention.sinogram_attention(np.maximum(maps["attention"][rows], circle), geom)
        np.testing.assert_allclose(out["tma"][rows], expected, atol=1e-5)
        assert circle.sum() == {256.0: 80, 600.0: 16}[fov_mm]  # centres (k + 1/2) px off-axis within 40 mm


FOV_MM = phantoms.FOV_MM["brain"]


def _phantom(size: int, supersample: int = 4) -> np.ndarray:
    """A head (ellipse) with a 20 mm hot lesion, a 24 mm cold lesion and a 56 mm cold region, in mm over
    the brain field of view, area-averaged onto `size` x `size` pixels (the same object at every size)."""
    n = size * supersample
    c = (np.arange(n) - (n - 1) / 2) * FOV_MM / n
    x, y = np.meshgrid(c, -c)
    disc = lambda cx, cy, r: (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    image = ((x / 75) ** 2 + (y / 95) ** 2 <= 1).astype(np.float32)
    image[disc(30, 40, 10)] = 4.0
    image[disc(-25, -35, 12)] = 0.15
    image[disc(20, -40, 28)] = 0.1
    return image.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def test_maps_agree_across_image_sizes():
    """The same brain phantom at 64 and 128 px, with the same `data.pixel_size` (8 mm, the cpu preset's):
    TMA in physical mm gives maps that agree after 2x2 averaging (image) and taking every other angle and
    averaging bin pairs (sinogram). With the configured pixel instead the image maps correlate at most 0.80
    and the sinogram maps 0.92 (pixel 2, 4 or 8 mm): the rule's lengths then change with the image size."""
    maps = {}
    for size in (64, 128):
        geom = radon.Geometry.square(size, pixel_size=FOV_MM / size, bin_spacing=FOV_MM / size)
        sino = np.asarray(radon.forward(jnp.asarray(_phantom(size)), geom))
        batch = {"source": sino[None, None], "prompt": np.array([[0, BRAIN, 1]], np.int32)}
        transform = TmaTransform(_config(size, 8.0))
        maps[size] = transform.image_maps(batch)["attention"][0], transform(batch)["tma"][0]
    (image64, sino64), (image128, sino128) = maps[64], maps[128]
    image128 = image128.reshape(64, 2, 64, 2).mean(axis=(1, 3))
    sino128 = sino128[::2].reshape(64, 64, 2).mean(axis=-1)
    assert image64.max() == 1.0 and sino64.max() == 1.0
    assert np.corrcoef(image64.ravel(), image128.ravel())[0, 1] > 0.9
    assert np.corrcoef(sino64.ravel(), sino128.ravel())[0, 1] > 0.97


def test_sampling_segments_files_in_the_configured_pixel_and_simulated_inputs_in_their_regions():
    """`sampling.model_batch` for a model trained on the simulator: a user's file is in `data.pixel_size`
    (4 mm here), whatever its prompt's region; a simulated brain input in 256 mm / 32 px = 8 mm."""
    from types import SimpleNamespace

    from allpet_jax import sampling

    config = _config(32, 4.0)
    config.tma.enabled = True
    trained = SimpleNamespace(config=config, meta={"normalisation": {"source_scale": 2.0, "target_scale": 2.0}},
                              directory="run/task", normalisation=pipeline.Normalisation(2.0, 2.0))
    geom = radon.Geometry.square(32, pixel_size=FOV_MM / 32, bin_spacing=FOV_MM / 32)
    sino = np.asarray(radon.forward(jnp.asarray(_phantom(32)), geom))[None, None]
    inputs = {"source": sino, "prompt": np.array([[0, BRAIN, 1]], np.int32)}
    tma = {}
    with jax.default_device(jax.devices("cpu")[0]):
        for from_files, pixel_mm in ((True, 4.0), (False, 8.0)):
            tma[from_files] = sampling.model_batch(trained, inputs, from_files=from_files)["tma"]
            geom = radon.Geometry.square(32, pixel_size=pixel_mm, bin_spacing=pixel_mm)
            normalised = sino[:, 0] / np.float32(2.0)
            expected = attention.attention_maps(normalised, geom, attention.TmaConfig())["sino_attention"]
            np.testing.assert_allclose(tma[from_files], expected, atol=1e-5)
    assert np.abs(tma[True] - tma[False]).max() > 0.1  # the pixel size matters for this phantom
