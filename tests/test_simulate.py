"""Paired-task simulation: shapes, determinism, count bookkeeping, Poisson statistics, corrections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import radon
from allpet_jax.data import phantoms as P
from allpet_jax.data import simulate as S

GEOM = radon.Geometry((64, 64), 48, 64)
KEYS = jax.random.split(jax.random.key(5), 2)


def compiled(fn, *args):
    """`jax.jit(fn)` compiled at XLA's lowest backend optimisation level: these tests check values, not
    speed, and this roughly halves the compile time that dominates them."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


OPTIONS = dict(region="brain", tracer="18F-FDG", dose=0.1, counts=3e5, scatter_fraction=0.2, randoms_fraction=0.25,
               resolution_mm=0.0, lesions=False, diagnostics=True)


@pytest.fixture(scope="module")
def simulated():
    """Every task with diagnostics, plus low_dose with explicit `OPTIONS`, for two keys (vmapped, as the
    pipeline calls it), run twice. One compile for all: much cheaper than one per task."""

    def all_tasks(key):
        out = {task: S.simulate_pair(key, task, GEOM, diagnostics=True) for task in S.TASKS}
        out["options"] = S.simulate_pair(key, "low_dose", GEOM, **OPTIONS)
        return out

    f = compiled(jax.vmap(all_tasks), KEYS)
    return jax.device_get(f(KEYS)), jax.device_get(f(KEYS))


@pytest.fixture(scope="module")
def pairs(simulated):
    """task -> (outputs, outputs of the second run)."""
    first, second = simulated
    return {task: (first[task], second[task]) for task in S.TASKS}


def test_every_task_pair_has_the_documented_shapes(pairs):
    A, B = GEOM.sino_shape
    channels = {task: (1, 1) for task in S.TASKS} | {"tracer_separation": (1, 2)}
    for task, (out, _) in pairs.items():
        c_src, c_tgt = channels[task]
        assert out["source"].shape == (2, c_src, A, B), task
        assert out["target"].shape == out["target_clean"].shape == (2, c_tgt, A, B), task
        assert out["image"].shape == (2, c_tgt, 64, 64), task
        assert out["mu"].shape == out["labels"].shape == (2, 64, 64)
        assert out["prompt"].shape == (2, 3) and out["prompt"].dtype == np.int32
        assert out["labels"].dtype == np.int32
        for name in ("source", "target", "target_clean", "image", "mu", "dose", "count_scale"):
            assert out[name].dtype == np.float32, (task, name)
        assert out["count_scale"].shape == (2, c_tgt)
        np.testing.assert_array_equal(out["prompt"][:, 2], S.TASKS.index(task))
        assert out["prompt"][:, 0].min() >= 0 and out["prompt"][:, 0].max() < len(S.TRACERS)
        assert out["prompt"][:, 1].min() >= 0 and out["prompt"][:, 1].max() < len(S.REGIONS)


def test_deterministic_from_the_key(pairs):
    for task, (out, again) in pairs.items():
        for name in out:
            np.testing.assert_array_equal(out[name], again[name], err_msg=f"{task}/{name}")
        assert not np.array_equal(out["target"][0], out["target"][1])  # two keys, two samples


def test_units_and_ranges(pairs):
    for task, (out, _) in pairs.items():
        assert out["mu"].min() >= 0 and out["mu"].max() <= 0.0171
        assert out["image"].min() >= 0 and out["target_clean"].min() >= 0
        assert np.isfinite(out["target"]).all() and np.isfinite(out["source"]).all()
        # kBq/mL: clinical activity concentrations are ~0.1-100 kBq/mL outside the bladder.
        body = out["labels"][:, None] > 0
        assert 0.3 < np.median(out["image"][np.broadcast_to(body, out["image"].shape)]) < 60, task
        if task == "synthesis":
            assert not out["source"].any()
        if task == "low_dose":
            assert set(np.round(1 / out["dose"]).astype(int)) <= {4, 10, 20, 50, 100}
        else:
            np.testing.assert_array_equal(out["dose"], 1.0)


def test_counts_scatter_and_randoms_fractions_are_clinical(pairs):
    for task, (out, _) in pairs.items():
        region = [S.REGIONS[r] for r in out["prompt"][:, 1]]
        for name in ("source_counts", "target_counts"):
            if task == "synthesis" and name == "source_counts":
                continue
            T, Sc, R = out[name].T
            sf, rf = Sc / (T + Sc), R / (T + Sc + R)
            lo = np.array([S.SCATTER_FRACTION_RANGE[r][0] for r in region])
            hi = np.array([S.SCATTER_FRACTION_RANGE[r][1] for r in region])
            assert np.all((sf > lo - 1e-4) & (sf < hi + 1e-4)), (task, name, sf)
            assert np.all(rf < 0.31), (task, name, rf)  # randoms fall below the reference's with activity^2
            # The Poisson means add up to the bookkeeping (separation targets: each tracer's trues).
            total = out[name.replace("counts", "mean")].sum(axis=(1, 2, 3))
            expected = T if (task, name) == ("tracer_separation", "target_counts") else T + Sc + R
            np.testing.assert_allclose(total, expected, rtol=1e-3)
        ref = out["target_counts" if task == "synthesis" else "source_counts"]
        if task != "low_dose":  # the full-dose reference acquisition has the drawn trues
            assert np.all((ref[:, 0] > 0.999e5) & (ref[:, 0] < 1.001e6)), (task, ref[:, 0])
            rf = ref[:, 2] / ref.sum(1)
            assert np.all((rf > 0.0999) & (rf < 0.3001)), (task, rf)


def test_prompts_are_poisson_counts(pairs):
    for task, (out, _) in pairs.items():
        for name in ("source", "target"):
            y = out[f"{name}_prompts"]
            assert y.min() >= 0 and np.array_equal(y, np.round(y)), (task, name)
    # z-scores of the bins with a mean above 1 in low_dose's two acquisitions (other tasks of the same
    # key reuse the same uniforms, so pooling them would not add independent draws).
    out = pairs["low_dose"][0]
    y = np.concatenate([out["source_prompts"].ravel(), out["target_prompts"].ravel()])
    m = np.concatenate([out["source_mean"].ravel(), out["target_mean"].ravel()])
    keep = m > 1.0
    z = (y[keep] - m[keep]) / np.sqrt(m[keep])
    assert z.size > 5_000
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    assert z.var() == pytest.approx(1.0, abs=6 * np.sqrt(2 / z.size))


def test_low_dose_source_is_unbiased_for_the_full_dose_target(pairs):
    out, _ = pairs["low_dose"]
    for i in range(2):
        d = out["dose"][i]
        T, Sc, R = out["target_counts"][i]
        np.testing.assert_allclose(out["source_counts"][i], [d * T, d * Sc, d * d * R], rtol=1e-4)
        # Var of each corrected, dose-normalised bin: mean prompts / (eta a d)^2.
        var = out["source_mean"][i, 0] / (out["normalisation"][i] * out["attenuation"][i] * d) ** 2
        diff = out["source"][i, 0].sum() - out["target_clean"][i, 0].sum()
        assert abs(diff) < 4 * np.sqrt(var.sum()), (diff, np.sqrt(var.sum()))


def test_attenuation_correction_pair_differs_by_attenuation_and_scatter(pairs):
    out, _ = pairs["attenuation_correction"]
    a, eta = out["attenuation"], out["normalisation"]
    scatter = out["source"][:, 0] - a * out["target"][:, 0]  # NAC = a * AC + scatter, bin by bin
    assert scatter.min() > -1e-3 * scatter.max()
    np.testing.assert_allclose((eta * scatter).sum(axis=(1, 2)), out["target_counts"][:, 1], rtol=2e-3)
    assert np.all(a > 0) and np.all(a <= 1)
    assert a.min() < 0.2  # through the body/head: attenuation dominates (e^-R mu)


def test_tracer_separation_channels_add_up_to_the_mixture(pairs):
    out, _ = pairs["tracer_separation"]
    background = out["source_prompts"][:, 0] - out["target_prompts"].sum(axis=1)
    assert background.min() >= 0  # mixture = tracer 1 + tracer 2 + randoms and scatter counts
    np.testing.assert_array_equal(out["prompt"][:, 0] >= S.TRACERS.index("11C-methionine"), True)
    share = out["target_clean"].sum(axis=(2, 3))
    assert np.all(share > 0.05 * share.sum(axis=1, keepdims=True))  # both tracers contribute


def test_delayed_frame_has_fewer_counts(pairs):
    out, _ = pairs["delayed_frame"]
    assert np.all(out["target_counts"][:, 0] < out["source_counts"][:, 0])
    assert np.all(out["prompt"][:, 0] <= S.TRACERS.index("68Ga-PSMA"))  # no 11C tracer


def test_explicit_options_and_the_count_scale(simulated):
    out = jax.tree.map(lambda x: x[0], simulated[0]["options"])
    np.testing.assert_array_equal(out["prompt"], [0, 0, S.TASKS.index("low_dose")])
    assert float(out["dose"]) == pytest.approx(0.1)
    T, Sc, R = out["target_counts"]
    assert T == pytest.approx(3e5, rel=1e-4)
    assert Sc / (T + Sc) == pytest.approx(0.2, rel=1e-4)
    assert R / (T + Sc + R) == pytest.approx(0.25, rel=1e-4)
    assert not np.isin(out["labels"], [P.LABEL_IDS["lesion_hot"], P.LABEL_IDS["lesion_cold"]]).any()
    # Without detector blur, target_clean = count_scale * R(image) exactly.
    projected = np.asarray(radon.forward(out["image"], GEOM)) * out["count_scale"][:, None, None]
    np.testing.assert_allclose(out["target_clean"], projected, atol=1e-4 * projected.max())
    # FDG grey matter at 60-70 min: SUV ~6 x 3.5 kBq/mL per SUV x 18F decay ~0.67 -> ~10-25 kBq/mL.
    gm = out["image"][0][out["labels"] == P.LABEL_IDS["grey_matter"]]
    assert 8 < np.median(gm) < 30


@pytest.mark.parametrize("mean", [0.05, 0.7, 3.0, 9.5, 15.9, 16.0, 40.0, 300.0])
def test_poisson_sampler_matches_the_poisson_distribution(mean):
    n = 200_000
    y = np.asarray(_poisson(jax.random.key(int(mean * 10)), jnp.full((n,), mean, jnp.float32)))
    assert np.array_equal(y, np.round(y)) and y.min() >= 0
    assert abs(y.mean() - mean) < 4 * np.sqrt(mean / n)
    assert y.var() == pytest.approx(mean, rel=5 * np.sqrt(2 / n) + 1 / (mean * n) ** 0.5)
    k = np.arange(int(mean + 10 * np.sqrt(mean) + 10))
    pmf = stats.poisson.pmf(k, mean)
    freq = np.bincount(y.astype(int), minlength=k.size)[: k.size] / n
    tv = 0.5 * np.abs(freq - pmf).sum() + 0.5 * (1 - pmf.sum())
    # Sampling noise alone gives TV ~ sqrt(#bins / n) / 2; the normal-quantile branch adds < 1.3e-3.
    assert tv < 0.6 * np.sqrt(np.count_nonzero(pmf > 1e-6) / n) + (1.3e-3 if mean >= 16 else 0.0)


_poisson = jax.jit(S.poisson)


def test_attenuation_factors_are_those_of_the_returned_mu(pairs):
    out, _ = pairs["attenuation_correction"]
    mm = np.array([P.FOV_MM[S.REGIONS[r]] / 64 for r in out["prompt"][:, 1]])  # physical pixel
    expected = np.exp(-np.asarray(radon.forward(out["mu"], GEOM)) * mm[:, None, None])
    np.testing.assert_allclose(out["attenuation"], expected, rtol=1e-4, atol=1e-6)


def test_scatter_and_randoms_rebuild_the_poisson_means(pairs):
    """`mean = eta * (a * t + s + r)` for the source and target acquisition of every task, with `t` from
    `target_clean` (times the dose for low_dose), and the totals equal to the simulator's own bookkeeping."""
    for task, (out, _) in pairs.items():
        eta, a = out["normalisation"][:, None], out["attenuation"][:, None]
        t = out["target_clean"]
        for side in ("source", "target"):
            s, r, mean = out[f"{side}_scatter"], out[f"{side}_randoms"], out[f"{side}_mean"]
            assert s.shape == r.shape == mean.shape == out[f"{side}_prompts"].shape, (task, side)
            assert s.dtype == r.dtype == np.float32 and s.min() >= 0 and r.min() >= 0
            assert (mean / eta - s - r).min() >= -1e-4 * mean.max(), (task, side)  # trues >= 0
            if (task, side) == ("tracer_separation", "target"):  # each tracer's trues alone
                assert not s.any() and not r.any()
                continue
            counts = out[f"{side}_counts"]  # (trues, scatter, randoms) detected, summed separately
            np.testing.assert_allclose((eta * s).sum(axis=(1, 2, 3)), counts[:, 1], rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose((eta * r).sum(axis=(1, 2, 3)), counts[:, 2], rtol=1e-4, atol=1e-3)
        source_trues = {"synthesis": 0.0 * t, "low_dose": out["dose"][:, None, None, None] * t,
                        "attenuation_correction": t, "tracer_separation": t.sum(axis=1, keepdims=True)}
        expected = {"target": t, "source": source_trues.get(task)}  # delayed/conversion: another frame
        for side, trues in expected.items():
            if trues is None:
                continue
            rebuilt = eta * (a * trues + out[f"{side}_scatter"] + out[f"{side}_randoms"])
            np.testing.assert_allclose(out[f"{side}_mean"], rebuilt, rtol=1e-4, atol=1e-5 * rebuilt.max(),
                                       err_msg=f"{task}/{side}")
        # a = exp(-R(mu)) in physical units: project mu on the geometry with the phantom's pixel in mm.
        for i in range(2):
            mm = P.FOV_MM[S.REGIONS[out["prompt"][i, 1]]] / 64
            physical = radon.Geometry((64, 64), GEOM.n_angles, GEOM.n_bins, pixel_size=mm, bin_spacing=mm)
            np.testing.assert_allclose(out["attenuation"][i], radon.attenuation_factors(out["mu"][i], physical),
                                       rtol=1e-4, atol=1e-6)


def test_bad_inputs_name_the_valid_choices():
    key = jax.random.key(0)
    cases = [
        (("denoise", GEOM), {}, "task must be one of"),
        (("low_dose", GEOM), {"region": "leg"}, "region must be one of"),
        (("delayed_frame", GEOM), {"tracer": "11C-acetate"}, "tracer for task 'delayed_frame' must be one of"),
        (("tracer_conversion", GEOM), {"tracer": "18F-FDG"}, "must be one of"),
        (("tracer_separation", GEOM), {"tracer": "68Ga-PSMA"}, "must be one of"),
        (("low_dose", GEOM), {"dose": 0.0}, r"dose .* in \(0.0, 1.0\]"),
        (("low_dose", GEOM), {"dose": 1.5}, "dose"),
        (("synthesis", GEOM), {"dose": 0.1}, "dose applies to task 'low_dose' only"),
        (("low_dose", GEOM), {"noise": True}, "unknown simulate_pair option"),
        (("low_dose", GEOM), {"scatter_fraction": 1.2}, "scatter_fraction"),
        (("low_dose", GEOM), {"lesions": "yes"}, "lesions must be True or False"),
        (("low_dose", "geometry"), {}, "geom must be a radon.Geometry"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            S.simulate_pair(key, *args, **kwargs)
