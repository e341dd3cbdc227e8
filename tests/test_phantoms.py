"""Random slice phantoms: determinism, anatomy per region, attenuation values, antialiasing, lesions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allpet_jax.data import kinetics as K
from allpet_jax.data import phantoms as P

N = 96
KEYS = jax.random.split(jax.random.key(7), 12)
REGION_IDS = jnp.arange(len(P.REGIONS))


def compiled(fn, *args):
    """`jax.jit(fn)` compiled at XLA's lowest backend optimisation level: these tests check values, not
    speed, and this roughly halves the compile time that dominates them."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def batch():
    """12 keys x 4 regions, one compile: labels (12, 4, N, N), mu, anatomy."""
    one = lambda k, r: P.phantom(k, (N, N), r, lesions=False)
    f = compiled(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)), KEYS, REGION_IDS)
    out = f(KEYS, REGION_IDS)
    again = f(KEYS, REGION_IDS)
    return out, again


def test_deterministic_from_the_key(batch):
    out, again = batch
    np.testing.assert_array_equal(out.labels, again.labels)
    np.testing.assert_array_equal(out.mu, again.mu)
    # Different keys give different anatomies.
    assert np.mean(out.labels[0] != out.labels[1]) > 0.02


def test_shapes_dtypes_and_attenuation_values(batch):
    out, _ = batch
    assert out.labels.shape == (12, 4, N, N) and out.labels.dtype == jnp.int32
    assert out.mu.shape == (12, 4, N, N) and out.mu.dtype == jnp.float32
    labels, mu = np.asarray(out.labels), np.asarray(out.mu)
    assert labels.min() >= 0 and labels.max() < len(P.LABELS)
    assert mu.min() >= 0.0 and mu.max() <= 0.0171
    assert np.all(mu[labels == P.LABEL_IDS["background"]] < 0.0099)  # air; edges hold partial volume
    assert np.all(mu[..., :2, :] == 0.0)  # the FOV border is air
    interior = lambda name: mu[labels == P.LABEL_IDS[name]]
    # Label-centre pixels away from edges carry the tissue's value; the median is robust to edges.
    assert np.median(interior("lung")) == pytest.approx(0.0030, rel=0.2)
    assert np.median(interior("skull")) == pytest.approx(0.0170, rel=0.05)
    assert np.median(interior("white_matter")) == pytest.approx(0.0099, rel=0.01)
    assert np.median(interior("liver")) == pytest.approx(0.0102, rel=0.01)
    assert np.median(interior("fat")) == pytest.approx(0.0090, rel=0.03)


def test_regions_contain_their_anatomy(batch):
    out, _ = batch
    labels = np.asarray(out.labels)
    expected = {
        "brain": ["scalp", "skull", "csf", "grey_matter", "white_matter", "ventricles", "caudate", "putamen",
                  "thalamus", "cerebellum", "brainstem"],
        "chest": ["fat", "soft_tissue", "lung", "myocardium", "blood_pool", "aorta", "spine", "bone", "liver"],
        "abdomen": ["fat", "soft_tissue", "liver", "spleen", "kidney", "pancreas", "bowel", "aorta", "spine"],
        "trunk": ["fat", "soft_tissue", "bone", "bladder", "prostate", "bowel", "aorta"],
    }
    forbidden = {"brain": ["lung", "liver", "fat"], "chest": ["grey_matter", "bladder", "prostate"],
                 "abdomen": ["lung", "grey_matter", "prostate"], "trunk": ["lung", "grey_matter", "liver"]}
    for r, region in enumerate(P.REGIONS):
        present = {P.LABELS[i] for i in np.unique(labels[:, r])}
        assert set(expected[region]) <= present, (region, set(expected[region]) - present)
        assert not set(forbidden[region]) & present, region
        assert not {"lesion_hot", "lesion_cold"} & present  # lesions=False


def test_physical_size_follows_the_field_of_view(batch):
    out, _ = batch
    mu = np.asarray(out.mu)
    pixel = {r: P.FOV_MM[r] / N for r in P.REGIONS}
    for r, region in enumerate(P.REGIONS):
        width_mm = (mu[:, r] > 0.004).any(axis=1).sum(axis=-1) * pixel[region]  # per sample, left-right
        height_mm = (mu[:, r] > 0.004).any(axis=2).sum(axis=-1) * pixel[region]
        if region == "brain":  # adult head: ~145 mm wide, ~185 mm long
            assert 115 < width_mm.min() and width_mm.max() < 185
            assert 150 < height_mm.min() and height_mm.max() < 230
        else:  # adult trunk: ~300-400 mm wide, ~200-280 mm deep
            assert 270 < width_mm.min() and width_mm.max() < 450
            assert 190 < height_mm.min() and height_mm.max() < 320
    np.testing.assert_allclose(out.anatomy.pixel_mm[0], [P.FOV_MM[r] / N for r in P.REGIONS], rtol=1e-6)


def test_coverage_is_the_area_fraction():
    # An ellipse of 23.3 x 14.1 mm on a 1 mm grid: the summed coverage is its area, and at 4x4
    # supersampling (what `supersample` does) every pixel agrees with a 16x16 reference to a few %.
    shapes = P.Shapes(jnp.array([1]), jnp.array([[0.31, -0.17]]), jnp.array([[23.3, 14.1]]), jnp.array([0.4]),
                      jnp.zeros((1, 5)), jnp.zeros(1), jnp.ones(1))
    rows, _, _ = P._shape_table(shapes, 1.0)

    def cover(n_sub):
        x = (np.arange(64 * n_sub) - (64 * n_sub - 1) / 2) / n_sub
        X, Y = np.meshgrid(x, -x)
        cov = P._coverage(jnp.asarray(X), jnp.asarray(Y), 0.0, rows[0], float(n_sub))
        return np.asarray(cov).reshape(64, n_sub, 64, n_sub).mean(axis=(1, 3))

    area = math.pi * 23.3 * 14.1
    assert cover(1).sum() == pytest.approx(area, rel=2e-3)
    ref = cover(16)
    assert ref.sum() == pytest.approx(area, rel=1e-3)
    assert np.abs(cover(1) - ref).max() < 0.1
    assert np.abs(cover(4) - ref).max() < 0.03
    edge = (ref > 0.05) & (ref < 0.95)
    assert edge.sum() > 40  # the antialiased rim exists


def test_supersampling_changes_only_edges():
    both = lambda k: [P.phantom(k, (48, 48), "chest", supersample=s).mu for s in (1, 3)]
    key = jax.random.key(2)
    a, b = (np.asarray(x) for x in compiled(both, key)(key))
    assert a.sum() == pytest.approx(b.sum(), rel=0.01)  # the same total attenuation
    assert np.mean(np.abs(a - b) > 1e-3) < 0.1


def test_lesion_labels_mark_where_activity_differs():
    # One anatomy rendered with its lesions and with them switched off: an FDG frame.
    key = jax.random.key(11)
    values = jax.jit(lambda: K.frame_activity(60.0, 70.0, K.kinetics_params(0), K.plasma_params(0), 109.77))()
    values = values[:, None]  # population FDG SUVs of every label, 60-70 min

    def both(k, region):
        an = P.sample_anatomy(k, region, image_size=N, max_hot_lesions=4, max_cold_lesions=3)
        off = an._replace(hot=an.hot._replace(present=0 * an.hot.present),
                          cold=an.cold._replace(present=0 * an.cold.present))
        hot = jnp.full((4, 1), 3.0) * values[P.LABEL_IDS["lesion_hot"]]
        cold = jnp.full((3, 1), 0.3)
        kw = dict(hot_values=hot, cold_factors=cold, textured=jnp.ones(1))
        return P.render(an, (N, N), values, **kw), P.render(off, (N, N), values, **kw)

    keys = jax.random.split(key, 6)
    regions = jnp.arange(6) % 4
    (lab, act), (lab0, act0) = compiled(jax.vmap(both), keys, regions)(keys, regions)
    lab, act, act0 = np.asarray(lab), np.asarray(act)[:, 0], np.asarray(act0)[:, 0]
    lesion = (lab == P.LABEL_IDS["lesion_hot"]) | (lab == P.LABEL_IDS["lesion_cold"])
    assert (lab == P.LABEL_IDS["lesion_hot"]).sum() > 20 and (lab == P.LABEL_IDS["lesion_cold"]).sum() > 20
    differs = np.abs(act - act0) > 0.01 * act0.max(axis=(1, 2), keepdims=True)
    assert np.all(differs[lesion])  # every lesion pixel changed the activity
    near = np.zeros_like(lesion)  # lesion pixels dilated by 3x3: edge pixels hold partial volumes
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            near |= np.roll(lesion, (di, dj), axis=(1, 2))
    assert np.all(near[differs])  # and nothing changed away from a lesion
    assert np.all(act >= 0) and np.all(act0 >= 0)
    hot = lab == P.LABEL_IDS["lesion_hot"]
    assert np.all(act[hot] > act0[hot])
    cold = lab == P.LABEL_IDS["lesion_cold"]
    assert np.all(act[cold] < act0[cold])
    assert np.array_equal(lab[~near], np.asarray(lab0)[~near])  # the anatomy itself is unchanged


def test_bad_inputs():
    with pytest.raises(ValueError, match="region must be one of"):
        P.phantom(jax.random.key(0), (32, 32), "leg")
    with pytest.raises(ValueError, match="image_shape"):
        P.phantom(jax.random.key(0), (32,), "brain")
    with pytest.raises(ValueError, match="supersample"):
        P.phantom(jax.random.key(0), (32, 32), "brain", supersample=0)
