"""allpet_jax.attention (TMA) and allpet_jax.rois: segmentation, scale invariance, sinogram bands, ROI edits."""

import functools
import json

import jax.numpy as jnp
import matplotlib.image
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

import radon
from allpet_jax import attention, rois
from allpet_jax.data.loaders import read_nifti

GEOM = radon.Geometry.square(64, 64, pixel_size=3.0, bin_spacing=3.0)  # 192 mm field of view
X, Y = np.meshgrid(GEOM.x_mm, GEOM.y_mm)
HOT = (35.0, 15.0, 8.0)  # x, y, radius in mm
COLD = (-25.0, -20.0, 12.0)


def _disc(x, y, r):
    return (X - x) ** 2 + (Y - y) ** 2 <= r**2


def _phantom(hot=True, cold=True):
    image = ((X / 80) ** 2 + (Y / 60) ** 2 <= 1).astype(np.float32)
    if hot:
        image[_disc(*HOT)] = 4.0
    if cold:
        image[_disc(*COLD)] = 0.15
    return image


@functools.lru_cache(maxsize=None)
def _maps(hot=True, cold=True, scale=1.0):
    """TMA of a noisy (Poisson, seeded) sinogram of the phantom, times `scale`."""
    sino = np.asarray(radon.forward(jnp.asarray(_phantom(hot, cold)), GEOM))
    noisy = np.random.default_rng(0).poisson(20.0 * sino).astype(np.float32) / 20.0
    maps = attention.attention_maps(jnp.asarray(scale * noisy), GEOM)
    return {k: np.asarray(v) for k, v in maps.items()}


def test_hot_and_cold_lesions_are_flagged_and_little_else():
    maps = _maps()
    assert maps["hyper"][_disc(HOT[0], HOT[1], 5)].all() and maps["hyper"][_disc(*HOT)].mean() > 0.5
    assert maps["hypo"][_disc(COLD[0], COLD[1], 6)].all() and maps["hypo"][_disc(*COLD)].mean() > 0.3
    assert maps["hyper"][_disc(COLD[0], COLD[1], 3)].sum() == 0 and maps["hypo"][_disc(HOT[0], HOT[1], 3)].all() == 0
    near = _disc(HOT[0], HOT[1], HOT[2] + 6) | _disc(COLD[0], COLD[1], COLD[2] + 6)
    flagged = maps["hyper"] | maps["hypo"]
    assert flagged[~near].sum() == 0
    a, s = maps["attention"], maps["sino_attention"]
    assert a.min() >= 0 and a.max() == 1 and s.min() >= 0 and np.isclose(s.max(), 1.0)
    assert np.all(a[~maps["body"]] < 0.05)  # nothing outside the body beyond the feather


@pytest.mark.parametrize("scale", [3.7, 1e-3])
def test_attention_is_invariant_to_global_scaling(scale):
    base, scaled = _maps(), _maps(scale=scale)
    for key in ("body", "hyper", "hypo"):
        np.testing.assert_array_equal(scaled[key], base[key])
    np.testing.assert_allclose(scaled["attention"], base["attention"], atol=1e-6)
    np.testing.assert_allclose(scaled["sino_attention"], base["sino_attention"], atol=1e-5)


def test_hot_lesion_band_follows_the_sinusoid():
    s_att = _maps(cold=False)["sino_attention"]
    centre = (s_att * GEOM.s_mm).sum(axis=1) / s_att.sum(axis=1)
    expected = HOT[0] * np.cos(GEOM.theta) + HOT[1] * np.sin(GEOM.theta)
    np.testing.assert_allclose(centre, expected, atol=0.5 * GEOM.bin_spacing)
    # The band is about as wide as the lesion plus its feather, not the whole detector.
    width = (s_att > 0.5).sum(axis=1) * GEOM.bin_spacing
    assert np.all(width <= 2 * HOT[2] + 4 * GEOM.bin_spacing)


def test_batched_call_matches_single_calls():
    sinos = np.stack([np.asarray(radon.forward(jnp.asarray(_phantom(h, c)), GEOM)) for h, c in ((1, 0), (0, 1))])
    batched = attention.attention_maps(jnp.asarray(sinos), GEOM)
    for n in range(2):
        single = attention.attention_maps(jnp.asarray(sinos[n]), GEOM)
        np.testing.assert_array_equal(np.asarray(batched["hyper"][n]), np.asarray(single["hyper"]))
        np.testing.assert_allclose(batched["attention"][n], single["attention"], atol=1e-6)


def test_image_tools_match_scipy_and_numpy():
    rng = np.random.default_rng(1)
    x = rng.random((3, 40, 50)).astype(np.float32)
    w = rng.random((3, 40, 50)) > 0.3
    q = np.asarray(attention.masked_quantile(jnp.asarray(x), jnp.asarray(w, jnp.float32), 0.5))
    np.testing.assert_array_equal(q, [np.quantile(x[i][w[i]], 0.5, method="inverted_cdf") for i in range(3)])
    holes = x > 0.4
    np.testing.assert_array_equal(attention._fill_holes(jnp.asarray(holes)), [ndimage.binary_fill_holes(h) for h in holes])
    dots = x > 0.99
    np.testing.assert_array_equal(attention._dilate(jnp.asarray(dots), 2), [ndimage.binary_dilation(d, np.ones((5, 5))) for d in dots])


# --- ROIs -------------------------------------------------------------------------------------------


def test_roi_add_and_suppress_change_the_map_only_inside_the_region():
    a = _maps()["attention"]
    add = rois.parse_rois([{"op": "add", "shape": "circle", "center_mm": [-40, 30], "radius_mm": 10}])
    edited = np.asarray(rois.apply_rois(a, add, GEOM))
    region = _disc(-40, 30, 10)
    np.testing.assert_array_equal(edited[~region], a[~region])
    assert np.all(edited[region] == 1.0)
    # In the sinogram the unnormalised projection changes exactly on the rays through the region.
    delta = np.asarray(radon.forward(jnp.asarray(edited), GEOM) - radon.forward(jnp.asarray(a), GEOM))
    rays = np.asarray(radon.forward(jnp.asarray(region, jnp.float32), GEOM)) > 0
    assert np.all(delta[~rays] == 0) and np.all(delta[rays] >= 0) and delta[rays].max() > 10

    box = rois.parse_rois([{"op": "suppress", "shape": "box", "center_mm": list(HOT[:2]), "size_mm": [30, 30]}])
    cleared = np.asarray(rois.apply_rois(a, box, GEOM))
    inside = (np.abs(X - HOT[0]) <= 15) & (np.abs(Y - HOT[1]) <= 15)
    assert np.all(cleared[inside] == 0) and a[inside].max() == 1
    np.testing.assert_array_equal(cleared[~inside], a[~inside])


def test_roi_shapes_in_geometry_coordinates():
    g = GEOM
    ellipse = rois.parse_rois([{"op": "add", "shape": "ellipse", "center_mm": [20, -10], "semi_axes_mm": [30, 10], "angle_deg": 90}])
    upright = (((X - 20) / 10) ** 2 + ((Y + 10) / 30) ** 2 <= 1 + 1e-9)
    np.testing.assert_array_equal(rois.shape_region(ellipse[0], g) > 0, upright)
    # x right, y up: a circle at (+60, +60) mm lies in the top-right corner of the array.
    corner = rois.shape_region(rois.parse_rois([{"op": "add", "shape": "circle", "center_mm": [60, 60], "radius_mm": 10}])[0], g)
    rows, cols = np.nonzero(corner)
    assert rows.max() < 32 and cols.min() >= 32


def test_label_and_file_rois(tmp_path):
    labels = np.zeros(GEOM.image_shape, np.int32)
    labels[10:20, 40:50] = 3
    labels[40:45, 5:15] = 7
    table = {"background": 0, "liver": 3, "lesion_hot": 7}
    zero = np.zeros(GEOM.image_shape, np.float32)
    out = np.asarray(rois.apply_rois(zero, rois.parse_rois([{"op": "add", "label": "liver"}]), GEOM, labels, table))
    np.testing.assert_array_equal(out, labels == 3)

    np.save(tmp_path / "mask.npy", labels)
    # NIfTI voxels are reoriented by the data loaders (allpet_jax.data.loaders.read_nifti); make a file that
    # reads back as `labels` whatever that convention is: it is an involution of flips and a transpose.
    probe = tmp_path / "probe.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), np.diag([3.0, 3.0, 3.0, 1.0])), probe)
    order = read_nifti(probe).astype(np.int64).ravel()  # image pixel p shows voxel order[p]
    data = np.zeros(64 * 64, np.float32)
    data[order] = labels.ravel()
    nib.save(nib.Nifti1Image(data.reshape(64, 64), np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(read_nifti(tmp_path / "mask.nii.gz"), labels)
    (tmp_path / "rois.json").write_text(json.dumps({"rois": [
        {"op": "add", "file": "mask.npy", "value": 7, "note": "relative to this file"},
        {"op": "add", "file": "mask.nii.gz", "value": 3, "weight": 0.5},
    ]}))
    loaded = rois.load_rois(tmp_path / "rois.json")
    out = np.asarray(rois.apply_rois(zero, loaded, GEOM))
    np.testing.assert_array_equal(out, np.where(labels == 7, 1.0, np.where(labels == 3, 0.5, 0.0)))

    config = ml_collections.ConfigDict({"rois": [{"op": "suppress", "label": "liver"}], "roi_file": str(tmp_path / "rois.json")})
    combined = rois.rois_from_config(config)
    assert [r.kind for r in combined] == ["label", "file", "file"] and combined[0].op == "suppress"


@pytest.mark.parametrize(
    "spec, message",
    [
        ([{"op": "add", "shape": "circle", "center_mm": [500, 0], "radius_mm": 10}], r"centre \(500, 0\) mm lies outside the field of view x in \[-96, 96\] mm"),
        ([{"op": "add", "shape": "circle", "center_mm": [0, 0], "radius_mm": 0.5}], "covers no pixel"),
        ([{"op": "add", "shape": "circle", "center_mm": [0, 0], "radius": 5}], r"unknown key\(s\) \['radius'\]; allowed keys: .*'radius_mm'"),
        ([{"op": "add", "shape": "box", "center_mm": [0, 0]}], r"missing key\(s\) \['size_mm'\]"),
        ([{"op": "highlight", "shape": "box", "center_mm": [0, 0], "size_mm": [1, 1]}], "'op' must be one of"),
        ([{"op": "add", "shape": "star", "center_mm": [0, 0]}], "unknown shape 'star'; known shapes"),
        ([{"op": "add", "label": "liver", "shape": "circle"}], "exactly one region key"),
        ([{"op": "add", "shape": "circle", "center_mm": [0], "radius_mm": 3}], "'center_mm' must be two numbers"),
        ([{"op": "add", "file": "/nonexistent/mask.npy"}], "does not exist"),
        ({"roi": []}, r"unknown top-level key\(s\) \['roi'\]"),
    ],
)
def test_bad_roi_specs_raise_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        rois.check_rois(rois.parse_rois(spec), GEOM)


def test_unknown_label_lists_the_known_ones():
    roi = rois.parse_rois([{"op": "add", "label": "spleeen"}])
    with pytest.raises(ValueError, match=r"unknown label 'spleeen'; known labels: \['liver', 'spleen'\]"):
        rois.apply_rois(np.zeros(GEOM.image_shape), roi, GEOM, np.zeros(GEOM.image_shape, np.int32), {"liver": 1, "spleen": 2})


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"op": "add", "label": "liver"}\n  {"op": "add"}\n]')
    with pytest.raises(ValueError, match=r"bad.json' is not valid JSON: Expecting ',' delimiter at line 3, column 3"):
        rois.load_rois(path)


def test_wrong_shape_label_file(tmp_path):
    np.save(tmp_path / "small.npy", np.ones((8, 8), np.int32))
    roi = rois.parse_rois([{"op": "add", "file": str(tmp_path / "small.npy")}])
    with pytest.raises(ValueError, match=r"has shape \(8, 8\); expected the image shape \(64, 64\)"):
        rois.check_rois(roi, GEOM)


def test_maps_save_as_png(tmp_path):
    maps = _maps()
    for key in ("attention", "sino_attention"):
        path = attention.save_map_png(maps[key], tmp_path / f"{key}.png")
        assert matplotlib.image.imread(path).shape[:2] == maps[key].shape


def test_config_section_mirrors_the_rule_constants():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("base_config", os.path.join(os.path.dirname(__file__), "..", "configs", "base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tma = module.get_config("smoke").tma
    assert attention.TmaConfig.from_config(tma) == attention.TmaConfig()
    assert rois.rois_from_config(tma) == ()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hyper_ration'\]"):
        attention.TmaConfig.from_config({**tma.to_dict(), "hyper_ration": 2.0})
    with pytest.raises(ValueError, match="hypo_ratio < 1 < hyper_ratio"):
        attention.TmaConfig(hyper_ratio=0.9)
