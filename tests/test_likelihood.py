"""Probability-flow log-likelihoods with exact scores, against closed forms and a slow float64
reference; Hutchinson's estimator against the exact trace; bits/dim.

The solver runs at rtol = atol = 1e-5 in float32 and 1e-9 in float64. Its global error in
log p, measured against the closed forms on these targets, is at most 1.2e-4 (VE; 3e-5 for VP
and sub-VP) in float32 and 1e-9 in float64: the tolerances below are 1e-3 and 1e-7.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from jsm import likelihood as L, sde as S, targets
from conftest import tol

SDES = {"ve": S.VESDE(), "vp": S.VPSDE(), "subvp": S.SubVPSDE()}
ODE_TOL = tol(1e-5, 1e-9)  # the solver's rtol and atol
LOG_P_TOL = tol(1e-3, 1e-7)  # the resulting error in log p
T_MIN = L.LIKELIHOOD_T_MIN


@pytest.fixture(scope="module")
def gaussian10():
    """A full-covariance Gaussian in d = 10, seen as 2 x 5 images (log_prob flattens any shape)."""
    a = jax.random.normal(jax.random.key(3), (10, 10))
    return targets.Gaussian(jnp.linspace(-1.0, 1.0, 10), a @ a.T / 10 + 0.5 * jnp.eye(10))


@pytest.fixture(scope="module")
def cases(mixture2, gaussian10):
    """name -> (sde, target, exact score s(x, t) of one example, example shape)."""
    out = {}
    for name, sde in SDES.items():
        out[f"mixture-{name}"] = (sde, mixture2, lambda x, t, sde=sde: sde.noised(mixture2, t).score(x), (2,))
    sde = SDES["vp"]
    out["gaussian10-vp"] = (sde, gaussian10, lambda x, t: sde.noised(gaussian10, t).score(x.reshape(-1)).reshape(x.shape),
                            (2, 5))
    return out


def _points(target, shape, n=6):
    return target.sample(jax.random.key(5), n).reshape((n,) + shape)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["mixture-ve", "mixture-vp", "mixture-subvp", "gaussian10-vp"])
def test_exact_log_prob_equals_the_closed_form(name, cases):
    """With the exact score, log π(x_T) + ∫ div v = log p_{t_min}(x): within the solver's error
    when π is the exact p_T, and within that plus the prior mismatch |log π(x_T) - log p_T(x_T)|
    with the SDE's prior. The mismatch is small but not negligible: ~1e-2 nats here, against
    1e-4 for the solver."""
    sde, target, score, shape = cases[name]
    xs = _points(target, shape)
    flat = xs.reshape(xs.shape[0], -1)
    exact = jax.vmap(sde.noised(target, T_MIN).log_prob)(flat)
    x_T, integral = L.flow_to_prior(score, sde, xs, rtol=ODE_TOL, atol=ODE_TOL)
    log_p_T = jax.vmap(sde.noised(target, 1.0).log_prob)(x_T.reshape(flat.shape))
    np.testing.assert_allclose(log_p_T + integral, exact, atol=LOG_P_TOL, rtol=0)

    got = L.log_prob(score, sde, xs, rtol=ODE_TOL, atol=ODE_TOL)  # the compiled solve is reused
    mismatch = jax.vmap(sde.prior_log_prob)(x_T) - log_p_T
    assert np.all(np.abs(mismatch) < 0.1), mismatch
    np.testing.assert_allclose(got, exact + mismatch, atol=LOG_P_TOL, rtol=0)
    # log p_{t_min} is log p_0 to O(σ_{t_min}²): 1e-6 nats here
    np.testing.assert_allclose(exact, jax.vmap(target.log_prob)(flat), atol=1e-4)


def _reference(score, sde, x, t_min=T_MIN):
    """The slow, obvious way: scipy's DOP853 in float64 on (x, ∫ tr ∂v/∂x) with the full Jacobian
    by jax.jacfwd, rtol = atol = 1e-10 (1e-7 when the vector field is float32: a tighter tolerance
    than its round-off only shrinks the steps)."""
    shape = x.shape
    v = lambda y, t: sde.drift(y, t) - 0.5 * sde.diffusion(t) ** 2 * score(y, t)
    flat = lambda y, t: v(y.reshape(shape), t).reshape(-1)
    both = jax.jit(lambda y, t: (flat(y, t), jnp.trace(jax.jacfwd(flat)(y, t))))

    def rhs(t, state):
        value, div = both(jnp.asarray(state[:-1], x.dtype), jnp.asarray(t, x.dtype))
        return np.append(np.asarray(value, np.float64), float(div))

    y0 = np.append(np.asarray(x, np.float64).reshape(-1), 0.0)
    sol = integrate.solve_ivp(rhs, (t_min, 1.0), y0, method="DOP853", rtol=tol(1e-7, 1e-10), atol=tol(1e-7, 1e-10))
    assert sol.success
    return sol.y[:-1, -1].reshape(shape), sol.y[-1, -1]


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["mixture-ve", "gaussian10-vp"])
def test_exact_log_prob_matches_a_slow_float64_reference(name, cases):
    """Same score, same ODE, two solvers: x_T and the integral agree to the solver's error (the
    float32 run is also limited by the float32 vector field the reference calls)."""
    sde, target, score, shape = cases[name]
    xs = _points(target, shape)  # the closed-form test's points and batch size: no new compile
    x_T, integral = L.flow_to_prior(score, sde, xs, rtol=ODE_TOL, atol=ODE_TOL)
    for i in range(2):
        ref_x_T, ref_integral = _reference(score, sde, xs[i])
        np.testing.assert_allclose(integral[i], ref_integral, atol=LOG_P_TOL, rtol=0)
        np.testing.assert_allclose(x_T[i], ref_x_T, rtol=tol(1e-3, 1e-7), atol=tol(1e-3, 1e-7))


def test_hutchinson_is_unbiased_and_noisy_the_exact_trace_is_neither(cases, key):
    """One point repeated 300 times: each copy gets its own Rademacher probe, fixed along its path.
    Their mean is the exact log p within 5 standard errors (plus the solver's error); their spread
    is what makes score_sde's bits/dim vary between runs. The exact trace takes no key: any key
    (ignored) and every copy give the same number."""
    sde, target, score, shape = cases["gaussian10-vp"]
    x = _points(target, shape)[:1]
    xs = jnp.repeat(x, 300, axis=0)
    exact = L.log_prob(score, sde, _points(target, shape), rtol=ODE_TOL, atol=ODE_TOL)
    estimates = np.asarray(L.log_prob(score, sde, xs, trace="hutchinson", key=key), np.float64)
    mean, se = estimates.mean(), estimates.std(ddof=1) / np.sqrt(estimates.size)
    assert abs(mean - float(exact[0])) < 5 * se + 1e-3, (mean, float(exact[0]), se)
    assert estimates.std() > 0.05  # several tenths of a nat per probe in d = 10
    again = L.log_prob(score, sde, jnp.repeat(x, 6, axis=0), key=jax.random.key(1), rtol=ODE_TOL, atol=ODE_TOL)
    assert np.all(np.asarray(again) == np.asarray(again)[0])
    np.testing.assert_allclose(again[0], exact[0], rtol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_bits_per_dim_of_dequantised_uniform_data_is_log2_k():
    """K values per dimension, dequantised by uniform noise over each bin: on [0, 1]^d with bins
    of width 1/K the density is 1 (log p = 0); on [0, K)^d with width 1 it is K^-d. Both are
    log2 K bits/dim exactly, the offset -log2 Δ supplying all of it in the first case."""
    d, k = 7, 256
    np.testing.assert_allclose(L.bits_per_dim(jnp.zeros(3), d, bin_width=1.0 / k), np.log2(k), rtol=tol(1e-6, 1e-12))
    np.testing.assert_allclose(L.bits_per_dim(-d * np.log(k), d, bin_width=1.0), np.log2(k), rtol=tol(1e-6, 1e-12))
    np.testing.assert_allclose(L.bits_per_dim(-d * np.log(k), d), np.log2(k), rtol=tol(1e-6, 1e-12))
    # continuous data: -log p / (d log 2); an integer log p is fine
    np.testing.assert_allclose(L.bits_per_dim(-3, 2), 3 / (2 * np.log(2)), rtol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_divergence_fn_takes_examples_of_any_shape():
    """On a (2, 3) example both traces are the trace of jax.jacfwd of the hand-flattened field (for
    Hutchinson, with the 6 probes sqrt(6) e_k, which make it exact), and v keeps the example's shape;
    a field that does not is refused. The field mixes rows and columns, so a transposed
    flattening would show."""
    x = jnp.arange(6.0).reshape(2, 3) / 5 - 0.4
    field = lambda z: jnp.sin(jnp.cumsum(z, axis=0)) * z[:, ::-1] + jnp.cumsum(z, axis=1) ** 2
    want = jnp.trace(jax.jacfwd(lambda v: field(v.reshape(2, 3)).reshape(-1))(x.reshape(-1)))
    probes = jnp.sqrt(6.0) * jnp.eye(6)
    for trace in L.TRACES:
        v, div = L.divergence_fn(field, trace, probes)(x)
        np.testing.assert_allclose(v, field(x), rtol=tol(1e-6, 1e-12))
        np.testing.assert_allclose(div, want, rtol=tol(1e-5, 1e-12))
        with pytest.raises(ValueError, match=r"vector_fn must map one example of shape \(2, 3\) to the same "
                                             r"shape, got shape \(3, 2\)"):
            L.divergence_fn(lambda z: field(z).T, trace, probes)(x)


def test_bad_input_is_rejected_before_compiling(cases, key):
    sde, _, score, _ = cases["mixture-vp"]
    xs = jnp.zeros((3, 2))
    bad = [
        (lambda: L.log_prob(score, sde, xs, t_min=0.0), ValueError, r"t_min must be in \(0, 1.0\)"),
        (lambda: L.log_prob(score, sde, xs, t_min=-1e-5), ValueError, "t_min must be in"),
        (lambda: L.log_prob(score, sde, xs.at[1, 1].set(jnp.inf)), ValueError, "xs must be finite"),
        (lambda: L.log_prob(score, sde, jnp.zeros(2)), ValueError, r"xs must be a batch of shape \(n, \*example_shape\)"),
        (lambda: L.log_prob(score, sde, xs, trace="jacfwd"), ValueError, "trace must be one of"),
        (lambda: L.log_prob(score, sde, xs, trace="hutchinson"), ValueError, "needs a PRNG key"),
        (lambda: L.log_prob(score, sde, xs, trace="hutchinson", key=key, n_probes=0), ValueError, "n_probes"),
        (lambda: L.log_prob(score, sde, xs, rtol=-1.0), ValueError, "rtol must be positive"),
        (lambda: L.log_prob(score, object(), xs), TypeError, "sde must be a jsm.sde SDE"),
        (lambda: L.bits_per_dim(jnp.zeros(2), 0), ValueError, "d must be an int >= 1"),
        (lambda: L.bits_per_dim(jnp.zeros(2), 2, bin_width=0.0), ValueError, "bin_width must be positive"),
    ]
    for make, error, match in bad:
        with pytest.raises(error, match=match):
            make()
