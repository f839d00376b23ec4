"""The score-matching identities, through the public API, against closed forms and quadrature.

Tolerances are 5 standard errors of the Monte Carlo estimate (from the sample
variance of the per-example terms) or the quadrature error of the grid.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsm
from jsm import nets, objectives as O
from conftest import grid_2d, tol


def linear_score(A, b):
    return lambda x: A @ x + b


def mean_and_se(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std() / np.sqrt(values.size)


@pytest.fixture(scope="module")
def mlp_scores():
    """Two different random score networks on R^2, as pure functions of x."""
    fns = []
    for seed in (0, 1):
        apply, params = nets.pure(nets.MLPScore(2, (32, 32), rngs=nnx.Rngs(seed)))
        fns.append(lambda x, apply=apply, params=params: 3.0 * apply(params, x))
    return fns


# --- closed forms for a linear score under a Gaussian ------------------------------


@pytest.mark.numerics
def test_esm_and_ism_of_a_linear_score_match_closed_forms(gaussian2, key):
    """p = N(m, Σ), s(x) = A x + b, P = Σ^{-1}:
    J_ESM = 1/2 [tr(B Σ B^T) + |B m + c|²] with B = A + P, c = b - P m,
    J_ISM = 1/2 [tr(A Σ A^T) + |A m + b|²] + tr A,  and  J_ESM - J_ISM = 1/2 tr P.
    """
    A, b = jnp.array([[-0.5, 0.2], [0.1, -1.5]]), jnp.array([0.3, -0.4])
    m, S = gaussian2.mean, gaussian2.cov
    P = jnp.linalg.inv(S)
    B, c = A + P, b - P @ m
    esm_exact = 0.5 * (jnp.trace(B @ S @ B.T) + jnp.sum((B @ m + c) ** 2))
    ism_exact = 0.5 * (jnp.trace(A @ S @ A.T) + jnp.sum((A @ m + b) ** 2)) + jnp.trace(A)
    np.testing.assert_allclose(esm_exact - ism_exact, 0.5 * jnp.trace(P), rtol=tol(1e-5, 1e-12))

    xs = gaussian2.sample(key, 50_000)
    s = linear_score(A, b)
    esm_i = jax.vmap(lambda x: O.esm_per_example(s, gaussian2.score, x))(xs)
    ism_i = jax.vmap(lambda x: O.ism_per_example(s, x))(xs)
    for per_example, exact in ((esm_i, esm_exact), (ism_i, ism_exact)):
        mean, se = mean_and_se(per_example)
        assert abs(mean - float(exact)) < 5 * se
    # The batch forms are the means of the per-example forms.
    np.testing.assert_allclose(O.esm(s, gaussian2.score, xs), esm_i.mean(), rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(O.ism(s, xs), ism_i.mean(), rtol=tol(1e-5, 1e-12))


# --- ISM of an energy model: the explicit fast path ----------------------------------


def logcosh_energy(W, c):
    """f(x) = Σ_k log cosh(z_k), z = W x + c: ∇f = Wᵀ tanh z, Δf = Σ_k (1 - tanh² z_k) |W_k|²."""
    return lambda x: jnp.sum(jnp.log(jnp.cosh(W @ x + c)))


@pytest.mark.numerics
@pytest.mark.parametrize("method", jsm.scores.METHODS)
def test_ism_energy_is_ism_of_the_energys_score(gaussian2, method, key):
    """E_p[1/2 |∇f|² - Δf] = J_ISM(-∇f), and for f = p's own energy it is -C = -1/2 tr Σ^{-1}
    in expectation (J_ESM = 0), within 5 SE; the same value whatever wraps f (jit, partial, a lambda)."""
    xs = gaussian2.sample(key, 20_000)
    terms = jax.jit(jax.vmap(lambda x: O.ism_energy_per_example(gaussian2.energy, x, method)))(xs)
    chex.assert_shape(terms, (20_000,))
    mean, se = mean_and_se(terms)
    assert abs(mean + 0.5 * float(jnp.trace(jnp.linalg.inv(gaussian2.cov)))) < 5 * se
    np.testing.assert_allclose(O.ism_energy(gaussian2.energy, xs, method), terms.mean(), rtol=tol(1e-5, 1e-12))

    W, c = jnp.array([[0.8, -0.4], [0.3, 1.1], [-0.5, 0.2]]), jnp.array([0.1, -0.2, 0.3])
    f = logcosh_energy(W, c)
    reference = float(O.ism(jsm.score_of(f), xs[:64], method="jacfwd"))
    wrapped = {"plain": f, "jit": jax.jit(f), "lambda": lambda x: f(x),
               "partial": functools.partial(lambda W, x: jnp.sum(jnp.log(jnp.cosh(W @ x + c))), W)}
    for name, g in wrapped.items():
        np.testing.assert_allclose(O.ism_energy(g, xs[:64], method), reference, rtol=tol(1e-5, 1e-11),
                                   atol=tol(1e-6, 1e-12), err_msg=name)


@pytest.mark.numerics
def test_chunked_ism_equals_unchunked(key):
    """chunk_size (Jacobian columns per block) changes memory, not the loss or its parameter gradient:
    d = 5 in blocks of 2, for a score network (`ism`) and an energy (`ism_energy`)."""
    xs = jax.random.normal(key, (8, 5))
    as_xs = lambda params: jax.tree.map(lambda a: a.astype(xs.dtype), params)
    apply, params = nets.pure(nets.MLPEnergy(5, (16, 16), rngs=nnx.Rngs(1)))
    s_apply, s_params = nets.pure(nets.MLPScore(5, (16, 16), rngs=nnx.Rngs(2)))
    for loss, p in [(lambda p, c: O.ism_energy(lambda x: apply(p, x), xs, chunk_size=c), as_xs(params)),
                    (lambda p, c: O.ism(lambda x: s_apply(p, x), xs, chunk_size=c), as_xs(s_params))]:
        # the blocks are a loop (lax.map) over the 3 blocks of 2 columns: chunk_size reached the jet
        assert "scan" in str(jax.make_jaxpr(lambda p: loss(p, 2))(p))
        assert "scan" not in str(jax.make_jaxpr(lambda p: loss(p, None))(p))
        (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(p, c) for c in (2, None))
        np.testing.assert_allclose(a, b, rtol=tol(1e-5, 1e-12))
        for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(u, v, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))


class PerExampleTermsAgainstSlowReferences(chex.TestCase):
    """Each per-example term, jitted and not, against the formula written out in NumPy (float64).

    s(x) = tanh(W x + c) on R^3 (∂s/∂x = diag(1 - tanh² z) W, not symmetric), p = N(0, I) (∇log p = -x),
    and the energy f of `logcosh_energy`.
    """

    W = np.array([[0.8, -0.4, 0.1], [0.3, 1.1, -0.6], [-0.5, 0.2, 0.9]])
    c = np.array([0.1, -0.2, 0.3])
    x, eps = np.array([0.4, -0.3, 1.2]), np.array([0.2, 0.5, -0.1])
    v = np.array([[1.0, -0.5, 0.3], [0.2, 0.7, -1.1]])
    sigma = 0.7

    def score(self, x):
        return jnp.tanh(jnp.asarray(self.W, x.dtype) @ x + jnp.asarray(self.c, x.dtype))

    def jac_ref(self, x):
        t = np.tanh(self.W @ x + self.c)
        return (1 - t**2)[:, None] * self.W, t

    def assert_close(self, got, want):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))

    @chex.variants(with_jit=True, without_jit=True)
    def test_esm(self):
        got = self.variant(lambda x: O.esm_per_example(self.score, lambda y: -y, x))(jnp.asarray(self.x))
        _, t = self.jac_ref(self.x)
        self.assert_close(got, 0.5 * sum((t[i] + self.x[i]) ** 2 for i in range(3)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_ism(self):
        got = self.variant(lambda x: O.ism_per_example(self.score, x))(jnp.asarray(self.x))
        jac, t = self.jac_ref(self.x)
        self.assert_close(got, 0.5 * sum(t[i] ** 2 for i in range(3)) + sum(jac[i, i] for i in range(3)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_ism_energy(self):
        f = logcosh_energy(jnp.asarray(self.W), jnp.asarray(self.c))
        got = self.variant(lambda x: O.ism_energy_per_example(f, x))(jnp.asarray(self.x))
        t = np.tanh(self.W @ self.x + self.c)
        grad = self.W.T @ t
        lap = sum((1 - t[k] ** 2) * sum(self.W[k, j] ** 2 for j in range(3)) for k in range(3))
        self.assert_close(got, 0.5 * grad @ grad - lap)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dsm(self):
        for vr in O.VARIANCE_REDUCTIONS:
            got = self.variant(lambda x, e: O.dsm_per_example(self.score, x, e, self.sigma, vr))(
                jnp.asarray(self.x), jnp.asarray(self.eps))
            term = lambda e: 0.5 * sum((np.tanh(self.W @ (self.x + e) + self.c)[i] + e[i] / self.sigma**2) ** 2
                                       for i in range(3))
            want = {None: term(self.eps), "antithetic": 0.5 * (term(self.eps) + term(-self.eps)),
                    "control_variate": term(self.eps) - self.eps @ np.tanh(self.W @ self.x + self.c) / self.sigma**2}[vr]
            self.assert_close(got, want)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ssm(self):
        got = self.variant(lambda x, v: O.ssm_per_example(self.score, x, v))(jnp.asarray(self.x), jnp.asarray(self.v))
        jac, t = self.jac_ref(self.x)
        self.assert_close(got, 0.5 * t @ t + np.mean([vj @ jac @ vj for vj in self.v]))


PerExampleTermsAgainstSlowReferences = pytest.mark.numerics(PerExampleTermsAgainstSlowReferences)


# --- the identities, measured by `score_matching_identities` ----------------------------


@pytest.mark.numerics
def test_identities_of_a_linear_score_on_a_gaussian_match_closed_forms(gaussian2, key):
    """p = N(m, Σ), s(x) = A x + b, P = Σ^{-1}, P_σ = (Σ + σ²I)^{-1}, B = A + P, B_σ = A + P_σ:

        J_ESM = 1/2 [tr(B Σ Bᵀ) + |B m + b - P m|²],     J_ISM = 1/2 [tr(A Σ Aᵀ) + |A m + b|²] + tr A,
        C = 1/2 tr P,   J_ESM(p_σ) = 1/2 [tr(B_σ Σ_σ B_σᵀ) + |B_σ m + b - P_σ m|²],
        C' = 1/2 tr P_σ - d/(2σ²),   J_DSM = J_ESM(p_σ) - C'.

    Every measured term within 5 SE of its closed form (SE from the per-example terms), the two gaps
    within 5 of their own (paired) SEs, and the batch forms `esm`, `ism`, `dsm` equal to the fields.
    """
    A, b = jnp.array([[-0.5, 0.2], [0.1, -1.5]]), jnp.array([0.3, -0.4])
    sigma, n = 1.0, 40_000
    m, S = np.asarray(gaussian2.mean, np.float64), np.asarray(gaussian2.cov, np.float64)
    An, bn = np.asarray(A, np.float64), np.asarray(b, np.float64)
    P, S_s = np.linalg.inv(S), S + sigma**2 * np.eye(2)
    P_s = np.linalg.inv(S_s)
    B, B_s = An + P, An + P_s
    c_noised = 0.5 * np.trace(P_s) - 2 / (2 * sigma**2)
    esm_noised = 0.5 * (np.trace(B_s @ S_s @ B_s.T) + np.sum((B_s @ m + bn - P_s @ m) ** 2))
    closed = {"esm": 0.5 * (np.trace(B @ S @ B.T) + np.sum((B @ m + bn - P @ m) ** 2)),
              "ism": 0.5 * (np.trace(An @ S @ An.T) + np.sum((An @ m + bn) ** 2)) + np.trace(An),
              "c": 0.5 * np.trace(P), "esm_noised": esm_noised, "c_noised": c_noised, "dsm": esm_noised - c_noised}

    k_x, k_eps = jax.random.split(key)
    xs = gaussian2.sample(k_x, n)
    s = linear_score(A, b)
    ids = O.score_matching_identities(s, gaussian2.score, gaussian2.noised(sigma).score, k_eps, xs, sigma)
    chex.assert_shape(list(ids), [()] * len(ids))
    eps = sigma * jax.random.normal(k_eps, xs.shape, xs.dtype)
    ys = xs + eps
    per_example = {
        "esm": jax.vmap(lambda x: O.esm_per_example(s, gaussian2.score, x))(xs),
        "ism": jax.vmap(lambda x: O.ism_per_example(s, x))(xs),
        "c": 0.5 * jnp.sum(jax.vmap(gaussian2.score)(xs) ** 2, -1),
        "esm_noised": jax.vmap(lambda y: O.esm_per_example(s, gaussian2.noised(sigma).score, y))(ys),
        "c_noised": 0.5 * jnp.sum(jax.vmap(gaussian2.noised(sigma).score)(ys) ** 2, -1) - 2 / (2 * sigma**2),
        "dsm": jax.vmap(lambda x, e: O.dsm_per_example(s, x, e, sigma))(xs, eps),
    }
    for name, exact in closed.items():
        mean, se = mean_and_se(per_example[name])
        np.testing.assert_allclose(getattr(ids, name), mean, rtol=tol(1e-4, 1e-10), err_msg=name)
        assert abs(mean - exact) < 5 * se, (name, mean, exact, se)
    for gap, se in ((ids.gap, ids.se), (ids.gap_noised, ids.se_noised)):
        assert abs(float(gap)) < 5 * float(se) and 0 < float(se) < 0.05, (gap, se)
    # The check rejects plausible wrong constants: C without its 1/2, C' without -d/(2σ²),
    # C' from the clean p instead of p_σ. Each moves the gap by many standard errors.
    wrong = {"C = E|∇log p|²": (ids.gap, ids.se, closed["c"]),
             "C' = 1/2 E|∇log p_σ|²": (ids.gap_noised, ids.se_noised, -2 / (2 * sigma**2)),
             "C' = 1/2 E|∇log p|² - d/(2σ²)": (ids.gap_noised, ids.se_noised, closed["c"] - 0.5 * np.trace(P_s))}
    for name, (gap, se, shift) in wrong.items():
        assert abs(float(gap) - shift) > 10 * float(se), name
    np.testing.assert_allclose(ids.dsm, O.dsm(s, k_eps, xs, sigma), rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(ids.ism, O.ism(s, xs), rtol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(ids.esm, O.esm(s, gaussian2.score, xs), rtol=tol(1e-5, 1e-12))


@pytest.mark.numerics
def test_identities_hold_for_a_network(mixture2, mlp_scores, key):
    """Any s satisfies both identities: a score network far from the truth, on a mixture."""
    sigma, n = 0.5, 20_000
    k_x, k_eps = jax.random.split(key)
    xs = mixture2.sample(k_x, n)
    ids = O.score_matching_identities(mlp_scores[0], mixture2.score, mixture2.noised(sigma).score, k_eps, xs, sigma)
    assert float(ids.esm) > 1.0  # far from the truth: the identity is not 0 = 0
    assert abs(float(ids.gap)) < 5 * float(ids.se) and abs(float(ids.gap_noised)) < 5 * float(ids.se_noised), ids


@pytest.mark.numerics
def test_esm_equals_ism_plus_constant_by_quadrature(mixture2, mlp_scores):
    """J_ESM(s) - J_ISM(s) = 1/2 ∫ p |∇log p|² for nonlinear s, on a grid (error < 1e-3)."""
    pts, area, _ = grid_2d((-6.0, -5.0), (6.0, 7.0), 300)
    pts = jnp.asarray(pts, jnp.float32)
    w = np.exp(np.asarray(jax.jit(jax.vmap(mixture2.log_prob))(pts), np.float64)) * area
    assert abs(w.sum() - 1) < 1e-4  # the grid holds the mass
    true_s = np.asarray(jax.vmap(mixture2.score)(pts), np.float64)
    constant = 0.5 * np.sum(w * np.sum(true_s**2, -1))
    gaps = []
    for s in mlp_scores:
        terms = jax.jit(
            jax.vmap(lambda x: (O.esm_per_example(s, mixture2.score, x), O.ism_per_example(s, x)))
        )
        esm_i, ism_i = (np.asarray(v, np.float64) for v in terms(pts))
        j_esm, j_ism = np.sum(w * esm_i), np.sum(w * ism_i)
        gaps.append(j_esm - j_ism)
        assert j_esm > 1.0  # far from the true score: the identity is not 0 = 0
    np.testing.assert_allclose(gaps, [constant] * 2, rtol=1e-3)


@pytest.mark.numerics
def test_esm_of_noised_target_equals_dsm_plus_constant(mixture2, mlp_scores, key):
    """J_ESM(s; p_σ) - J_DSM(s) = C' = 1/2 E_{p_σ}|∇log p_σ|² - d/(2σ²), for any s.

    Paired Monte Carlo: the same (x, ε) feed both per-example terms; C' by quadrature.
    """
    sigma, n = 0.5, 200_000
    p_sigma = mixture2.noised(sigma)
    pts, area, _ = grid_2d((-7.0, -6.0), (7.0, 8.0), 300)
    pts = jnp.asarray(pts, jnp.float32)
    w = np.exp(np.asarray(jax.jit(jax.vmap(p_sigma.log_prob))(pts), np.float64)) * area
    true_s = np.asarray(jax.vmap(p_sigma.score)(pts), np.float64)
    constant = 0.5 * np.sum(w * np.sum(true_s**2, -1)) - 2 / (2 * sigma**2)

    k_x, k_eps = jax.random.split(key)
    xs = mixture2.sample(k_x, n)
    eps = sigma * jax.random.normal(k_eps, xs.shape)
    esm_values = []
    for s in mlp_scores:
        diff = jax.jit(
            jax.vmap(
                lambda x, e: O.esm_per_example(s, p_sigma.score, x + e) - O.dsm_per_example(s, x, e, sigma)
            )
        )(xs, eps)
        mean, se = mean_and_se(diff)
        assert abs(mean - constant) < 5 * se, (mean, constant, se)
        esm_values.append(float(O.esm(s, p_sigma.score, xs + eps)))
    assert abs(esm_values[0] - esm_values[1]) > 1.0  # two genuinely different models


def test_dsm_draws_its_noise_as_documented(mlp_scores, mixture2, key):
    s, sigma = mlp_scores[0], 0.3
    xs = mixture2.sample(key, 64)
    eps = sigma * jax.random.normal(key, xs.shape)
    manual = jnp.mean(jax.vmap(lambda x, e: O.dsm_per_example(s, x, e, sigma))(xs, eps))
    np.testing.assert_allclose(O.dsm(s, key, xs, sigma), manual, rtol=tol(1e-6, 1e-12))


def unflatten_linear(theta):
    """θ (6,) -> the linear score x -> A x + b on R^2, A = θ[:4] as 2 x 2, b = θ[4:]."""
    return linear_score(theta[:4].reshape(2, 2), theta[4:])


@pytest.mark.numerics
@pytest.mark.parametrize("variance_reduction", O.VARIANCE_REDUCTIONS)
def test_dsm_is_minimised_by_the_noised_score(gaussian2, variance_reduction, key):
    """Over linear scores s(y) = A y + b, DSM's minimiser on Gaussian data N(m, Σ) is the noised
    score -(Σ + σ²I)^{-1}(y - m): A* = -(Σ + σ²I)^{-1}, b* = (Σ + σ²I)^{-1} m.

    DSM is quadratic in θ = (A, b), so its sample minimiser is one Newton step θ* = -H^{-1} ∇L(0).
    Its standard error is the M-estimator's sandwich sqrt(diag(H^{-1} Cov(∇ℓ_i) H^{-1}) / n), ∇ℓ_i the
    per-example gradients at θ*. Data and noise come from independent keys.
    """
    sigma, n = 0.5, 20_000
    k_x, k_eps = jax.random.split(key)
    xs = gaussian2.sample(k_x, n)
    loss = lambda theta: O.dsm(unflatten_linear(theta), k_eps, xs, sigma, variance_reduction)
    zero = jnp.zeros(6, xs.dtype)
    hess, grad = jax.jit(jax.hessian(loss))(zero), jax.jit(jax.grad(loss))(zero)
    theta = -jnp.linalg.solve(hess, grad)
    eps = sigma * jax.random.normal(k_eps, xs.shape, xs.dtype)  # the noise `dsm` draws
    per_example = lambda x, e: jax.grad(
        lambda t: O.dsm_per_example(unflatten_linear(t), x, e, sigma, variance_reduction))(theta)
    g = np.asarray(jax.jit(jax.vmap(per_example))(xs, eps), np.float64)
    h_inv = np.linalg.inv(np.asarray(hess, np.float64))
    se = np.sqrt(np.diag(h_inv @ np.cov(g.T) @ h_inv) / n)
    p_sigma = np.linalg.inv(np.asarray(gaussian2.cov, np.float64) + sigma**2 * np.eye(2))
    want = np.concatenate([-p_sigma.ravel(), p_sigma @ np.asarray(gaussian2.mean, np.float64)])
    # Precise enough to tell the noised score from the clean one: Σ^{-1} m - (Σ + σ²I)^{-1} m = (0.36, -0.17).
    assert np.all(se < 0.025), se
    np.testing.assert_array_less(np.abs(np.asarray(theta, np.float64) - want), 5 * se)


@pytest.mark.numerics
def test_ssm_is_an_unbiased_estimate_of_ism(mixture2, mlp_scores, key):
    s = mlp_scores[0]
    xs = mixture2.sample(key, 16)
    exact = float(O.ism(s, xs))
    draws = jax.jit(jax.vmap(lambda k: O.ssm(s, k, xs, n_projections=1)))(jax.random.split(key, 4000))
    mean, se = mean_and_se(draws)
    assert abs(mean - exact) < 5 * se


def test_ncsn_weights_each_level_by_sigma_squared(mixture2, key):
    apply, params = nets.pure(nets.NoiseConditionalScore(2, (16,), rngs=nnx.Rngs(0)))
    s = lambda x, sigma: apply(params, x, sigma)
    x, eps, sigma = jnp.array([0.1, 0.2]), jnp.array([0.3, -0.1]), jnp.float32(0.4)
    np.testing.assert_allclose(
        O.ncsn_per_example(s, x, eps, sigma),
        sigma**2 * O.dsm_per_example(lambda y: s(y, sigma), x, eps, sigma),
        rtol=tol(1e-6, 1e-12),
    )
    # With a single level, the batch loss is σ² times DSM at that level, draw for draw.
    xs = mixture2.sample(key, 32)
    one = float(O.ncsn(s, key, xs, jnp.array([0.4])))
    _, k_noise = jax.random.split(key)
    np.testing.assert_allclose(one, 0.16 * float(O.dsm(lambda y: s(y, 0.4), k_noise, xs, 0.4)), rtol=tol(1e-5, 1e-12))


@pytest.mark.slow
def test_ism_overfits_a_small_data_set_and_dsm_cannot(key):
    """A flexible score (a bump at each data point) drives J_ISM to -∞ on 8 points:
    at an isolated x_i, s(x_i) = 0 and tr ∂s/∂x = -a d for amplitude a. Trained the same
    way, J_DSM stays above its floor J_DSM(s*), s* the score of the noised empirical law.
    """
    d, sigma = 2, 0.3
    data = 3.0 * jax.random.normal(key, (8, d))

    def bumps(params, x):
        a, h = jnp.exp(params["log_a"]), jnp.exp(params["log_h"])
        diff = x - data
        k = jnp.exp(-0.5 * jnp.sum(diff**2, -1) / h**2)
        return -a * (k @ diff)

    def train(loss):
        params = {"log_a": jnp.float32(0.0), "log_h": jnp.float32(-1.0)}
        result = jsm.fit(loss, params, data, optimizer=optax.adam(0.05), key=key, steps=300,
                         batch_size=8, log_every=50, progress=False)
        return result

    ism = train(lambda p, k, xs: O.ism(lambda x: bumps(p, x), xs))
    ism_losses = [row["loss"] for row in ism.history]
    assert ism_losses[-1] < -1e3 and ism_losses[-1] < 2 * ism_losses[-2] < 0  # still falling fast

    dsm = train(lambda p, k, xs: O.dsm(lambda x: bumps(p, x), k, xs, sigma))
    empirical = jsm.targets.GaussianMixture(data, jnp.full(8, sigma), jnp.ones(8))
    xs = jnp.tile(data, (4000, 1))
    eps = sigma * jax.random.normal(jax.random.fold_in(key, 1), xs.shape)
    excess = jax.vmap(
        lambda x, e: O.dsm_per_example(lambda y: bumps(dsm.params, y), x, e, sigma)
        - O.dsm_per_example(empirical.score, x, e, sigma)
    )(xs, eps)
    mean, se = mean_and_se(excess)
    assert mean > -5 * se  # J_DSM(s) - J_DSM(s*) = J_ESM(s; p̂_σ) >= 0


# --- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, k: O.esm(s, s, jnp.zeros(2)), ValueError,
         r"xs must be a batch of shape \(n, \*example_shape\) with n >= 1 .*got shape \(2,\)"),
        (lambda s, k: O.dsm(s, k, jnp.zeros(3), 0.5), ValueError, r"xs must be a batch of shape \(n, \*example_shape\)"),
        (lambda s, k: O.ncsn(s, k, jnp.zeros((0, 2, 3)), jnp.array([1.0])), ValueError, r"got shape \(0, 2, 3\)"),
        (lambda s, k: O.ism(s, jnp.zeros((0, 2))), ValueError, r"xs must be a batch .*with n >= 1 .*got shape \(0, 2\)"),
        (lambda s, k: O.ism(s, jnp.array([[0.0, jnp.nan]])), ValueError, "xs must be finite, got 1 non-finite"),
        (lambda s, k: O.ism(s, jnp.zeros((3, 2)), method="hutch"), ValueError, "method must be one of"),
        (lambda s, k: O.ism_energy(jnp.sum, jnp.zeros((3, 2)), method="hutch"), ValueError, "method must be one of"),
        (lambda s, k: O.ism_energy(jnp.sum, jnp.zeros(2)), ValueError,
         r"xs must be a batch of shape \(n, \*example_shape\) with n >= 1 .*got shape \(2,\)"),
        (lambda s, k: O.ism_per_example(s, jnp.zeros(())), ValueError, r"x must be ONE example .*got a scalar"),
        (lambda s, k: O.ism(s, jnp.zeros((3, 2)), method="jacfwd", chunk_size=2), ValueError,
         r'chunk_size applies to method="forward" \(or "auto"\) only, got method=\'jacfwd\''),
        (lambda s, k: O.ism_energy(jnp.sum, jnp.zeros((3, 2)), method="jacrev", chunk_size=2), ValueError,
         'chunk_size applies to method="forward"'),
        (lambda s, k: O.ism_energy(jnp.sum, jnp.zeros((3, 2)), chunk_size=0), ValueError,
         "chunk_size must be an int >= 1 or None, got 0"),
        (lambda s, k: O.score_matching_identities(s, s, s, k, jnp.zeros((1, 2)), 0.5), ValueError,
         r"xs must hold at least 2 examples for a standard error, got shape \(1, 2\)"),
        (lambda s, k: O.score_matching_identities(s, s, s, k, jnp.zeros((3, 2)), 0.0), ValueError, "sigma must be positive"),
        (lambda s, k: O.dsm(s, k, jnp.zeros((3, 2)), 0.0), ValueError, "sigma must be positive"),
        (lambda s, k: O.dsm(s, k, jnp.zeros((3, 2)), -1.0), ValueError, "sigma must be positive"),
        (lambda s, k: O.dsm(s, 0, jnp.zeros((3, 2)), 1.0), TypeError, "key must be a PRNG key"),
        (lambda s, k: O.dsm(s, k, np.array([["a", "b"]]), 1.0), TypeError, "xs must be an array of floats"),
        (lambda s, k: O.ncsn(s, k, jnp.zeros((3, 2)), jnp.array([])), ValueError, "sigmas must hold at least one"),
        (lambda s, k: O.ncsn(s, k, jnp.zeros((3, 2)), jnp.array([1.0, -0.1])), ValueError, "sigmas must be positive"),
        (lambda s, k: O.ssm(s, k, jnp.zeros((3, 2)), n_projections=0), ValueError, "n_projections must be an int >= 1"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, match, key):
    with pytest.raises(error, match=match):
        call(lambda x: -x, key)


# --- examples of any shape: images (n, h, w, c) ------------------------------------------


class TestImageShapedExamples:
    """On (n, 2, 3) examples, each objective equals itself on the flattened (n, 6) data with the
    flattened score, draw for draw (the noise of shape (n, 2, 3) is the flat draw reshaped), and so
    do its parameter gradients. s(x) = tanh(W vec(x) + c) with W not symmetric, so a transposed or
    partial flattening would show; the sums run over all six entries."""

    shape, n = (2, 3), 16
    W0 = jax.random.normal(jax.random.key(7), (6, 6))
    c0 = jnp.linspace(-0.5, 0.5, 6)
    sigmas = jnp.array([2.0, 0.7, 0.2])

    def flat(self, W, c):
        return lambda v, sigma=1.0: jnp.tanh(W @ v + c) / sigma

    def image(self, W, c):
        return lambda x, sigma=1.0: self.flat(W, c)(x.reshape(-1), sigma).reshape(x.shape)

    def data(self, key):
        return jax.random.normal(key, (self.n, *self.shape))

    def assert_same(self, objective, key, flat=None, image=None):
        """objective(score, xs) on images and on flat vectors: the values and the W-gradients agree.
        (`flat` and `image` make another model of W and c, an energy say, on either.)"""
        flat, image = flat or self.flat, image or self.image
        xs = self.data(key)
        on_images = lambda W: objective(image(W, self.c0), xs)
        on_vectors = lambda W: objective(flat(W, self.c0), xs.reshape(self.n, -1))
        (a, ga), (b, gb) = jax.value_and_grad(on_images)(self.W0), jax.value_and_grad(on_vectors)(self.W0)
        assert a.shape == () and abs(float(a)) > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("variance_reduction", O.VARIANCE_REDUCTIONS)
    def test_dsm(self, variance_reduction, key):
        self.assert_same(lambda s, xs: O.dsm(s, key, xs, 0.5, variance_reduction), key)

    @pytest.mark.parametrize("variance_reduction", O.VARIANCE_REDUCTIONS)
    def test_ncsn(self, variance_reduction, key):
        self.assert_same(lambda s, xs: O.ncsn(s, key, xs, self.sigmas, variance_reduction), key)

    def test_esm_and_ssm(self, key):
        self.assert_same(lambda s, xs: O.esm(s, lambda x: -x, xs), key)
        self.assert_same(lambda s, xs: O.ssm(s, key, xs, n_projections=3), key)

    def test_ncsn_on_images_is_the_mean_of_its_per_example_terms(self, key):
        """The batch form against the per-example form, with the draws written out: every level
        σ_i and noise ε_i of shape (2, 3); a wrongly broadcast σ (over rows or columns) would show."""
        xs, s = self.data(key), self.image(self.W0, self.c0)
        k_level, k_noise = jax.random.split(key)
        sigma = self.sigmas[jax.random.randint(k_level, (self.n,), 0, 3)]
        eps = np.asarray(jax.random.normal(k_noise, xs.shape)) * np.asarray(sigma)[:, None, None]
        want = np.mean([O.ncsn_per_example(s, xs[i], eps[i], sigma[i]) for i in range(self.n)])
        np.testing.assert_allclose(O.ncsn(s, key, xs, self.sigmas), want, rtol=1e-6)

    def test_a_score_of_the_wrong_shape_is_refused(self, key):
        flat = self.flat(self.W0, self.c0)
        wrong = lambda x, sigma=1.0: flat(x.reshape(-1), sigma)  # returns (6,) for a (2, 3) example
        msg = r"score_fn must map one example of shape \(2, 3\) to the same shape, got shape \(6,\)"
        for call in (lambda: O.dsm(wrong, key, self.data(key), 0.5),
                     lambda: O.ncsn(wrong, key, self.data(key), self.sigmas, "control_variate"),
                     lambda: O.esm(wrong, lambda x: -x, self.data(key)),
                     lambda: O.ssm(wrong, key, self.data(key)),
                     lambda: O.ism(wrong, self.data(key)),
                     lambda: O.ism(wrong, self.data(key), "jacrev"),
                     lambda: O.ism_per_example(wrong, self.data(key)[0]),
                     lambda: O.score_matching_identities(wrong, lambda x: -x, lambda x: -x, key, self.data(key), 0.5)):
            with pytest.raises(ValueError, match=msg):
                call()
        with pytest.raises(ValueError, match=r"true_score_fn must map one example of shape \(2, 3\) to the same shape"):
            O.score_matching_identities(lambda x: -x, wrong, lambda x: -x, key, self.data(key), 0.5)
        per_row = lambda x: jnp.sum(x**2, axis=-1)  # an energy of ONE vector: (2, 3) -> (2,)
        for method in ("auto", "jacfwd"):
            with pytest.raises(ValueError, match=r"energy_fn must map one example of shape \(2, 3\) to a scalar, "
                                                 r"got shape \(2,\)"):
                O.ism_energy(per_row, self.data(key), method)

    @pytest.mark.parametrize("method, chunk_size", [("auto", None), ("auto", 4), ("jacfwd", None), ("jacrev", None)])
    def test_ism(self, method, chunk_size, key):
        self.assert_same(lambda s, xs: O.ism(s, xs, method, chunk_size=chunk_size), key)

    @pytest.mark.parametrize("method, chunk_size", [("auto", None), ("auto", 4), ("jacfwd", None)])
    def test_ism_energy(self, method, chunk_size, key):
        """f(x) = Σ_k log cosh((W vec x + c)_k): the same loss and W-gradient on images and on vectors."""
        flat = lambda W, c: (lambda v: jnp.sum(jnp.log(jnp.cosh(W @ v + c))))
        image = lambda W, c: (lambda x: flat(W, c)(x.reshape(-1)))
        self.assert_same(lambda f, xs: O.ism_energy(f, xs, method, chunk_size=chunk_size), key, flat, image)

    def test_identities(self, key):
        def every_field(s, xs):  # all eight measured terms in one scalar: a wrong one shows
            true = lambda x: -x
            noised = lambda x: -x / (1 + 0.5**2)
            return sum(jnp.sum(jnp.asarray(v) * w) for v, w in
                       zip(O.score_matching_identities(s, true, noised, key, xs, 0.5), jnp.arange(1.0, 9.0)))
        self.assert_same(every_field, key)

    def test_ism_per_example_terms_against_the_brute_force_trace(self, key):
        """1/2 |s(x)|² + tr ∂s/∂x for one (2, 3) example, the trace of jax.jacfwd of the flat score;
        s mixes the image's rows (a cumulative sum down the columns), so its trace is not that of
        any one row."""
        s_flat = lambda v: jnp.tanh(self.W0 @ v + self.c0)
        s = lambda x: s_flat(x.reshape(-1)).reshape(x.shape) * jnp.cumsum(x, axis=0)
        f = lambda x: jnp.sum(jnp.log(jnp.cosh(self.W0 @ x.reshape(-1) + self.c0))) * jnp.sum(jnp.cumsum(x, axis=1) ** 2)
        x = self.data(key)[0]
        flat = lambda g: (lambda v: g(v.reshape(self.shape)).reshape(-1))
        want_ism = 0.5 * jnp.sum(s(x) ** 2) + jnp.trace(jax.jacfwd(flat(s))(x.reshape(-1)))
        grad = jax.grad(f)(x)
        want_energy = 0.5 * jnp.sum(grad**2) - jnp.trace(jax.hessian(lambda v: f(v.reshape(self.shape)))(x.reshape(-1)))
        ways = [(m, None) for m in jsm.scores.EXACT_METHODS] + [("auto", 4)]
        got = jax.jit(lambda x: [(O.ism_per_example(s, x, m, chunk_size=c), O.ism_energy_per_example(f, x, m, chunk_size=c))
                                 for m, c in ways])(x)
        for (m, c), (ism, ism_energy) in zip(ways, got):
            np.testing.assert_allclose(ism, want_ism, rtol=1e-5, err_msg=f"{m} {c}")
            np.testing.assert_allclose(ism_energy, want_energy, rtol=1e-5, err_msg=f"{m} {c}")


# --- low-variance DSM ----------------------------------------------------------------


@pytest.mark.numerics
def test_variance_reduced_dsm_is_unbiased_and_matches_the_theorys_variance(gaussian2, key):
    """Linear score s(x) = A x + b on a 2-D Gaussian at σ = 0.01; per-example b-gradients.

    Theory (see `dsm`): Var_plain = tr(AΣAᵀ) + |σA + I/σ|², Var_cv = tr(AΣAᵀ) + σ²|A|², Var_anti = tr(AΣAᵀ),
    with the data covariance Σ = Cov(x). Sample variances of 20k draws are within 10% (their relative
    standard error is about sqrt(2/20000) times a kurtosis factor).
    """
    sigma, n = 0.01, 20_000
    A, b = jnp.array([[-0.8, 0.3], [0.1, -0.6]]), jnp.array([0.2, -0.1])
    S = gaussian2.cov
    k_x, k_eps = jax.random.split(key)
    xs = gaussian2.sample(k_x, n)[:, None, :]  # n batches of one example
    keys = jax.random.split(k_eps, n)

    def grads(vr):
        g = lambda b, k, x: jax.grad(lambda b: O.dsm(lambda y: A @ y + b, k, x, sigma, variance_reduction=vr))(b)
        return np.asarray(jax.jit(jax.vmap(g, in_axes=(None, 0, 0)))(b, keys, xs), np.float64)

    base = float(jnp.trace(A @ S @ A.T))
    theory = {
        None: base + float(jnp.sum((sigma * A + jnp.eye(2) / sigma) ** 2)),
        "control_variate": base + sigma**2 * float(jnp.sum(A**2)),
        "antithetic": base,
    }
    draws = {vr: grads(vr) for vr in theory}
    for vr, g in draws.items():
        np.testing.assert_allclose(g.var(0).sum(), theory[vr], rtol=0.1)
    ratio = draws[None].var(0).sum() / draws["control_variate"].var(0).sum()
    assert ratio > 100 * 100  # the issue asks for >= 100x; at σ = 0.01 the theory gives ~10^4
    # Unbiased: all three mean gradients agree with the exact one, E[Ax + b] = A m + b, within 5 SE.
    exact = np.asarray(A @ gaussian2.mean + b)
    for vr, g in draws.items():
        se = g.std(0) / np.sqrt(n)
        np.testing.assert_array_less(np.abs(g.mean(0) - exact), 5 * se)


def test_ncsn_variance_reduction_keeps_the_value_in_expectation(mixture2, key):
    apply, params = nets.pure(nets.NoiseConditionalScore(2, (16,), rngs=nnx.Rngs(0)))
    s = lambda x, sigma: apply(params, x, sigma)
    xs = mixture2.sample(key, 256)
    sigmas = jnp.array([1.0, 0.1, 0.01])
    draws = {vr: np.asarray(jax.jit(jax.vmap(lambda k: O.ncsn(s, k, xs, sigmas, variance_reduction=vr)))(
        jax.random.split(key, 300))) for vr in O.VARIANCE_REDUCTIONS}
    plain = draws[None]
    for vr in ("antithetic", "control_variate"):
        d = draws[vr]
        se = np.sqrt(plain.var() / plain.size + d.var() / d.size)
        assert abs(d.mean() - plain.mean()) < 5 * se
        assert d.var() < plain.var()


def test_unknown_variance_reduction_raises(key):
    with pytest.raises(ValueError, match=r"variance_reduction must be one of \(None, 'antithetic', 'control_variate'\), got 'anti'"):
        O.dsm(lambda x: -x, key, jnp.zeros((3, 2)), 0.1, variance_reduction="anti")
    with pytest.raises(ValueError, match="variance_reduction must be one of"):
        O.ncsn(lambda x, s: -x, key, jnp.zeros((3, 2)), jnp.array([1.0]), variance_reduction="cv")
