"""Tracer kinetics against hand-computed closed forms and an ODE solver (float64 references)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from allpet_jax.data import kinetics as K
from allpet_jax.data.phantoms import LABEL_IDS

FDG = K.TRACERS.index("18F-FDG")
PLASMA = K.plasma_params(FDG)
P64 = {name: float(getattr(PLASMA, name)) for name in K.Plasma._fields}


def kin(K1, k2, k3=0.0, k4=0.0, vB=0.0):
    return K.Kinetics(*(jnp.float32(v) for v in (K1, k2, k3, k4, vB)))


def feng_terms():
    """Feng's input as a list of (coefficient, power of t, rate): Cp(t + tau) = sum c t^n e^{l t}."""
    p = P64
    return [(p["A1"], 1, p["l1"]), (-p["A2"] - p["A3"], 0, p["l1"]), (p["A2"], 0, p["l2"]), (p["A3"], 0, p["l3"])]


def one_tissue_terms(K1, k2):
    """The one-tissue curve C(t + tau) = K1 (Cp conv e^{-k2 t}) as terms (c, n, rate), by hand:
    int_0^t e^{ls} e^{-k2(t-s)} ds = (e^{lt} - e^{-k2 t}) / (l + k2) and
    int_0^t s e^{ls} e^{-k2(t-s)} ds = t e^{lt}/(l+k2) - (e^{lt} - e^{-k2 t})/(l+k2)^2."""
    out = []
    for c, n, lam in feng_terms():
        d = lam + k2
        if n == 0:
            out += [(K1 * c / d, 0, lam), (-K1 * c / d, 0, -k2)]
        else:
            out += [(K1 * c / d, 1, lam), (-K1 * c / d**2, 0, lam), (K1 * c / d**2, 0, -k2)]
    return out


def curve(terms, t):
    s = np.maximum(t - P64["tau"], 0.0)
    return np.where(t > P64["tau"], sum(c * s**n * np.exp(r * s) for c, n, r in terms), 0.0)


def frame_integral(terms, t0, t1, decay):
    """int_{t0}^{t1} C(t) e^{-decay t} dt in closed form (t0 >= tau): with s = t - tau each term is
    c s^n e^{r s} e^{-decay (s + tau)}; int e^{a s} = e^{a s}/a, int s e^{a s} = e^{a s}(a s - 1)/a^2."""
    s0, s1 = t0 - P64["tau"], t1 - P64["tau"]
    total = 0.0
    for c, n, r in terms:
        a = r - decay
        if n == 0:
            prim = lambda s: math.exp(a * s) / a
        else:
            prim = lambda s: math.exp(a * s) * (a * s - 1) / a**2
        total += c * math.exp(-decay * P64["tau"]) * (prim(s1) - prim(s0))
    return total


@pytest.mark.parametrize("K1,k2", [(0.102, 0.13), (0.6, 1.2), (0.05, 0.0104)])
def test_one_tissue_curve_matches_closed_form(K1, k2):
    # (0.05, 0.0104) puts k2 within 1e-4 of -l2: the near-degenerate case the stable forms exist for.
    t = np.array([0.3, 0.7, 1.0, 2.5, 10.0, 37.0, 60.0, 125.0])
    ref = curve(one_tissue_terms(K1, k2), t)
    got = np.asarray(K.tissue_curve(jnp.asarray(t, jnp.float32), kin(K1, k2), PLASMA))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("t0,t1", [(60.0, 70.0), (120.0, 130.0), (0.0, 10.0), (0.5, 3.0)])
def test_one_tissue_frame_matches_closed_form(t0, t1):
    K1, k2, half = 0.3, 0.25, K.HALF_LIFE_MIN["18F"]
    decay = math.log(2) / half
    lo = max(t0, P64["tau"])  # the curve is zero before the bolus arrives
    ref = frame_integral(one_tissue_terms(K1, k2), lo, t1, decay) / (t1 - t0)
    got = float(K.frame_activity(t0, t1, kin(K1, k2), PLASMA, half))
    assert got == pytest.approx(ref, rel=1e-5)


def test_two_tissue_curve_matches_ode_solution():
    K1, k2, k3, k4, vB = 0.102, 0.13, 0.062, 0.0068, 0.05  # FDG grey matter with a k4 (Phelps 1979)

    def cp(t):  # Feng's input in float64 numpy, from its terms
        return curve([(c, n, r) for c, n, r in feng_terms()], t)

    def rhs(t, c):
        return [K1 * cp(t) - (k2 + k3) * c[0] + k4 * c[1], k3 * c[0] - k4 * c[1]]

    t = np.array([1.0, 5.0, 30.0, 65.0, 125.0])
    sol = solve_ivp(rhs, (0.0, 125.0), [0.0, 0.0], t_eval=t, rtol=1e-10, atol=1e-12, max_step=0.05)
    ref = (1 - vB) * sol.y.sum(0) + vB * cp(t)
    np.testing.assert_allclose(K.plasma_input(jnp.asarray(t, jnp.float32), PLASMA), cp(t), rtol=1e-5)
    got = np.asarray(K.tissue_curve(jnp.asarray(t, jnp.float32), kin(K1, k2, k3, k4, vB), PLASMA))
    np.testing.assert_allclose(got, ref, rtol=2e-4)


def test_pure_accumulation_is_the_integral_of_the_input():
    # k2 = k3 = k4 = 0 (urine in the bladder): C(t) = K1 int_0^t Cp.
    t = 60.0
    s = t - P64["tau"]
    integral = sum(c * (math.expm1(r * s) / r if n == 0 else (math.exp(r * s) * (r * s - 1) + 1) / r**2)
                   for c, n, r in feng_terms())
    got = float(K.tissue_curve(jnp.float32(t), kin(0.12, 0.0), PLASMA))
    assert got == pytest.approx(0.12 * integral, rel=1e-5)
    later = float(K.tissue_curve(jnp.float32(120.0), kin(0.12, 0.0), PLASMA))
    assert later > got


def test_half_lives_and_units():
    assert K.HALF_LIFE_MIN["18F"] == pytest.approx(109.77)
    assert K.HALF_LIFE_MIN["11C"] == pytest.approx(20.364)
    assert K.HALF_LIFE_MIN["68Ga"] == pytest.approx(67.71)
    for nuc, minutes in K.HALF_LIFE_MIN.items():
        assert K.HALF_LIFE_S[nuc] == pytest.approx(60 * minutes)
    assert K.nuclide("68Ga-PSMA") == "68Ga"
    np.testing.assert_allclose(K.TRACER_HALF_LIFE_MIN, [109.77, 109.77, 67.71, 20.364, 20.364], rtol=1e-6)
    # Decay alone: a constant curve over a frame averages 2^{-t/T} (vB = 1 with a flat input is not
    # available, so compare the decayed and undecayed frame of the same curve).
    k = kin(0.1, 0.0)  # accumulating curve, slowly varying at 60-61 min
    with_decay = float(K.frame_activity(60.0, 61.0, k, PLASMA, 20.364))
    without = float(K.frame_activity(60.0, 61.0, k, PLASMA, 1e9))
    assert with_decay / without == pytest.approx(2 ** (-60.5 / 20.364), rel=1e-3)


def test_plasma_input_is_scaled_to_the_tabulated_suv():
    for i, tracer in enumerate(K.TRACERS):
        cp = float(K.plasma_input(jnp.float32(60.0), K.plasma_params(i)))
        assert cp == pytest.approx(K._PLASMA_SHAPE[tracer][2], rel=1e-4), tracer
        assert float(K.plasma_input(jnp.float32(0.2), K.plasma_params(i))) == 0.0  # before the bolus


def suv(tracer, label, t):
    i = K.TRACERS.index(tracer)
    return float(K.tissue_curve(jnp.float32(t), K.kinetics_params(i), K.plasma_params(i))[LABEL_IDS[label]])


def test_tabulated_kinetics_give_clinical_uptake_patterns():
    assert 5.0 < suv("18F-FDG", "grey_matter", 65) < 10.0
    assert suv("18F-FDG", "grey_matter", 65) > 1.7 * suv("18F-FDG", "white_matter", 65)
    assert 1.8 < suv("18F-FDG", "liver", 65) < 3.0
    assert 1.3 < suv("18F-FDG", "blood_pool", 65) < 2.2
    assert suv("18F-FDG", "lesion_hot", 125) > suv("18F-FDG", "lesion_hot", 65)  # tumours keep trapping
    assert suv("18F-FDG", "liver", 125) < suv("18F-FDG", "liver", 65)  # liver washes out (k4 > 0)
    assert suv("18F-DOPA", "putamen", 85) > 1.8 * suv("18F-DOPA", "grey_matter", 85)  # striatal uptake
    assert suv("68Ga-PSMA", "kidney", 65) > 20 * suv("68Ga-PSMA", "grey_matter", 65) > 0
    assert suv("68Ga-PSMA", "liver", 65) > suv("68Ga-PSMA", "blood_pool", 65)
    assert suv("11C-acetate", "bladder", 15) < suv("11C-acetate", "myocardium", 15)  # little urine
    assert suv("11C-methionine", "pancreas", 25) > 5.0
    fdg = K.KINETICS[FDG]
    k4_nonzero = {name for name, row in zip(LABEL_IDS, fdg) if row[3] != 0}
    assert k4_nonzero == {"liver"}  # FDG k4 ~ 0 except hepatic dephosphorylation


def test_sample_kinetics_is_deterministic_and_varies():
    f = jax.jit(K.sample_kinetics, static_argnames="variability")
    a = f(jax.random.key(3), FDG)
    b = f(jax.random.key(3), FDG)
    c = f(jax.random.key(4), FDG)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a[0].K1, c[0].K1)
    pop = f(jax.random.key(3), FDG, variability=0.0)
    np.testing.assert_allclose(pop[0].K1, K.KINETICS[FDG, :, 0], rtol=1e-6)
    assert float(pop[1].tau) == pytest.approx(0.5)
    ratio = np.asarray(a[0].K1) / np.maximum(K.KINETICS[FDG, :, 0], 1e-12)
    used = K.KINETICS[FDG, :, 0] > 0
    assert 0.4 < ratio[used].min() and ratio[used].max() < 2.5
