"""The first-layer seed on every forward jet: where x enters f only through z = x W, W (d, h), d > h,
second-order jets run along the h columns of Q (W = QR) and come back by ∇_x = Q ∇_u, Δ_x = Δ_u;
first-order ones start at z along I_h and come back by W: tr ∂v/∂x = Σ_j w_j · ∂v/∂z_j. Each path
(batched, chunked, vmapped, under jax.grad) against the d-row path (`_reduce=False`) and
jax.grad / jax.hessian / jax.jacfwd references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsm
from jsm import forward, likelihood, nets, objectives, sde as sde_lib
from jsm.diffusion import ode_drift

from conftest import tol

N = 4
FEATURES = 2  # t's features beside x in the "concat" case: y = [x, γ(t)]


def _params(d: int, h: int, out: int, dead_unit: bool) -> dict:
    """A tanh MLP d -> h -> 7 -> out; `dead_unit`: first-layer column 2 zero (W of rank h - 1)."""
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    w1 = jax.random.normal(k1, (d, h)) / np.sqrt(d)
    p = {"w1": w1.at[:, 2].set(0.0) if dead_unit else w1, "b1": jnp.linspace(-0.5, 0.5, h),
         "w2": jax.random.normal(k2, (h, 7)) / np.sqrt(h), "w3": jax.random.normal(k3, (7, out)) / np.sqrt(7),
         "b3": jnp.linspace(-0.2, 0.2, out)}
    return jax.tree.map(lambda a: a.astype(jnp.zeros(()).dtype), p)


def _hidden(p, x):
    y = jnp.concatenate([x, jnp.array([0.3, -0.7], x.dtype)]) if x.shape[0] + FEATURES == p["w1"].shape[0] else x
    return jnp.tanh(jnp.tanh(y @ p["w1"] + p["b1"]) @ p["w2"])


def energy(p, x):
    return jnp.sum(jax.nn.softplus(_hidden(p, x) @ p["w3"] + p["b3"]))


def score(p, x):
    return _hidden(p, x) @ p["w3"] + p["b3"]


# (d, input width of the first layer, h, seeded): the energy's first layer acts on y = [x, 2 features]
# (a concatenate before the product), the score's on x; "rank_deficient" (W of rank h - 1) has the same
# shapes, so the same compiled code runs it (∂f/∂z then by the jet, not the solve with R); "wide"
# (d < h): the d rows of I.
CASES = {"concat": (12, 12 + FEATURES, 5, True), "rank_deficient_concat": (12, 12 + FEATURES, 5, True),
         "dense": (12, 12, 5, True), "rank_deficient": (12, 12, 5, True), "wide": (4, 4, 6, False)}


def _case(name: str, out: int | None):
    d, width, h, seeded = CASES[name]
    xs = jax.random.normal(jax.random.key(3), (N, d)).astype(jnp.zeros(()).dtype)
    return xs, _params(width, h, d if out is None else out, name.startswith("rank_deficient")), seeded


def _close(got, want, what, rtol=None):
    rtol = tol(1e-4, 1e-10) if rtol is None else rtol
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.all(np.isfinite(a)), what
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(b)))), err_msg=what)


def _seeds(fn, *args) -> bool:
    """Whether tracing fn seeds a jet at a first-layer product z = x W (`forward._seeded_product`)."""
    calls, seeded_product = [], forward._seeded_product

    def recording(*a):
        calls.append(a)
        return seeded_product(*a)

    forward._seeded_product = recording
    try:
        jax.make_jaxpr(fn)(*args)
    finally:
        forward._seeded_product = seeded_product
    return bool(calls)


_energy = lambda p: (lambda x: energy(p, x))
_score = lambda p: (lambda x: score(p, x))


@jax.jit
def _energy_paths(p, xs):
    """References, the jets by every path, and the gradient of ism_energy's loss (seeded, d rows, jacfwd)."""
    f = _energy
    ref = (jax.vmap(f(p))(xs), jax.vmap(jax.grad(f(p)))(xs), jax.vmap(lambda x: jnp.trace(jax.hessian(f(p))(x)))(xs))
    jets = {"chunked": forward.forward_jet_batch(f(p), chunk_size=2)(xs),
            "d_rows": forward.forward_jet_batch(f(p), _reduce=False)(xs),
            "vmapped": jax.vmap(forward.forward_jet(f(p)))(xs)}  # forward_jet_batch on the batch

    def d_rows(p):  # ism_energy's loss, 1/2 |∇f|² - Δf, by the d rows of I
        jet = forward.forward_jet_batch(f(p), _reduce=False)(xs)
        return jnp.mean(0.5 * jnp.sum(jet.jacobian**2, axis=-1) - jet.laplacian)

    grads = {"seeded": jax.grad(lambda q: objectives.ism_energy(f(q), xs))(p), "d_rows": jax.grad(d_rows)(p),
             "jacfwd": jax.grad(lambda q: objectives.ism_energy(f(q), xs, method="jacfwd"))(p)}
    # A loss linear in ∇f: its derivative in W needs ∇f's turn out of W's span (`forward._to_x`).
    a = jnp.linspace(-1.0, 1.0, xs.shape[1], dtype=xs.dtype)
    linear = {"seeded": jax.grad(lambda q: jnp.mean(forward.forward_jet_batch(f(q))(xs).jacobian @ a))(p),
              "reference": jax.grad(lambda q: jnp.mean(jax.vmap(jax.grad(f(q)))(xs) @ a))(p)}
    return ref, jets, grads, linear


@jax.jit
def _divergence_paths(p, xs):
    """References, the divergence by every path, and the gradient of ISM's loss (batched, vmapped, jacfwd)."""
    s = _score
    ref = (jax.vmap(s(p))(xs), jax.vmap(lambda x: jnp.trace(jax.jacfwd(s(p))(x)))(xs))
    divs = {"batch": forward.divergence_batch(s(p))(xs), "chunked": forward.divergence_batch(s(p), chunk_size=3)(xs),
            "d_rows": forward.divergence_batch(s(p), _reduce=False)(xs),
            "vmapped": (ref[0], jax.vmap(jsm.divergence(s(p)))(xs))}
    vmapped = lambda q: jnp.mean(jax.vmap(lambda x: 0.5 * s(q)(x) @ s(q)(x) + jsm.divergence(s(q))(x))(xs))
    grads = {"ism": jax.grad(lambda q: objectives.ism(s(q), xs))(p), "vmapped": jax.grad(vmapped)(p),
             "jacfwd": jax.grad(lambda q: objectives.ism(s(q), xs, method="jacfwd"))(p)}
    return ref, divs, grads


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["concat", "rank_deficient_concat"])
def test_seeded_energy_jets_and_the_ism_energy_step(name):
    """forward_jet_batch of an energy on [x, features] (chunked: blocks of R's rows, the last padded;
    d rows) and vmap(forward_jet) give f, ∇f = Q ∇_u f and Δf = Δ_u f as jax.grad and tr jax.hessian
    do; jax.grad of ism_energy's loss (the training step) equals jacfwd's and the d-row loss's, and
    so does the gradient of a loss linear in ∇f (W's columns turning out of their span count there),
    at any rank of W."""
    xs, p, seeded = _case(name, 1)
    assert bool(forward._full_rank(p["w1"][:12])) != name.startswith("rank_deficient")
    ref, jets, grads, linear = _energy_paths(p, xs)
    for path, jet in jets.items():
        _close(tuple(jet), ref, f"{name}: {path}")
    for path in ("seeded", "d_rows"):
        _close(grads[path], grads["jacfwd"], f"{name}: gradient, {path}")
    _close(linear["seeded"], linear["reference"], f"{name}: gradient of a loss linear in ∇f")
    assert _seeds(forward.forward_jet_batch(_energy(p)), xs) == seeded


def test_a_first_layer_wider_than_x_keeps_the_d_rows():
    """d = 4 < h = 6: forward_jet_batch and divergence_batch trace to the d-row jaxpr (no seed)."""
    xs, p, _ = _case("wide", None)
    paths = [lambda r: forward.forward_jet_batch(lambda x: jnp.sum(score(p, x) ** 2), _reduce=r),
             lambda r: forward.divergence_batch(_score(p), _reduce=r)]
    for path in paths:
        seeded, d_rows = (str(jax.make_jaxpr(path(r))(xs)) for r in (True, False))
        assert seeded == d_rows and not _seeds(path(True), xs)


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["dense", "rank_deficient"])
def test_seeded_divergence_and_its_parameter_gradient(name):
    """divergence_batch (all at once, chunked, d rows), vmap(jsm.divergence) and objectives.ism give
    tr ∂s/∂x = Σ_j w_j · ∂s/∂z_j (the jet from z = x W along I_h) as tr jax.jacfwd does, and jax.grad
    of the ISM loss of the score network, batched and vmapped (through W's columns and the last
    layer's contraction), equals jacfwd's; a rank-deficient W needs no fallback."""
    xs, p, seeded = _case(name, None)
    ref, divs, grads = _divergence_paths(p, xs)
    for path, got in divs.items():
        _close(got, ref, f"{name}: {path}")
    for path in ("ism", "vmapped"):
        _close(grads[path], grads["jacfwd"], f"{name}: ISM gradient, {path}")
    assert _seeds(forward.divergence_batch(_score(p)), xs) == seeded


@pytest.mark.numerics
def test_likelihood_field_splits_off_the_drift_and_seeds_the_score():
    """The probability-flow field v = f - g² s / 2 of a VP SDE, per example at its own t (as in the ODE
    solve): v and div v = div f - g² div s / 2 equal ode_drift and tr jax.jacfwd(ode_drift), for an
    MLP on [x, t] (seeded) and the preconditioned NoiseConditionalScore (x scaled by c_in(t) and
    skipped: the d rows of I)."""
    from flax import nnx

    d, sde = 12, sde_lib.VPSDE()
    xs = jax.random.normal(jax.random.key(4), (N, d)).astype(jnp.zeros(()).dtype)
    ts = jnp.linspace(0.1, 0.9, N, dtype=xs.dtype)
    p = _params(d + 1, 5, d, False)  # s(x, t) = MLP([x, t])
    mlp = lambda x, t: jnp.tanh(jnp.tanh(jnp.concatenate([x, t[None]]) @ p["w1"] + p["b1"]) @ p["w2"]) @ p["w3"]
    apply, q = nets.pure(nets.NoiseConditionalScore(d, (5,), noise="t", data_scale=1.0, marginal=sde.marginal,
                                                    rngs=nnx.Rngs(0)))
    q = jax.tree.map(lambda a: a.astype(xs.dtype), q)
    for name, s, seeded in (("mlp on [x, t]", mlp, True), ("preconditioned", lambda x, t: apply(q, x, t), False)):
        field = lambda x, t: likelihood._field_and_divergence(s, sde, t, "exact", None)(x)
        reference = lambda x, t: (ode_drift(s, sde, x, t), jnp.trace(jax.jacfwd(lambda z: ode_drift(s, sde, z, t))(x)))
        got, want = jax.jit(lambda xs, ts: (jax.vmap(field)(xs, ts), jax.vmap(reference)(xs, ts)))(xs, ts)
        _close(got, want, name)
        assert _seeds(jax.vmap(field), xs, ts) == seeded, name


@pytest.mark.numerics
@pytest.mark.parametrize("dead_column", [False, True])
def test_the_seeds_qr_and_back_substitution_are_linear_algebra(dead_column):
    """The seed's own Householder QR (W = QR, QᵀQ = I, R upper triangular; a zero column of W gives a zero
    diagonal entry of R) and its triangular solve, against NumPy's."""
    w = np.array(jax.random.normal(jax.random.key(3), (9, 4)), np.asarray(jnp.zeros(())).dtype)
    if dead_column:
        w[:, 2] = 0.0
    q, r = forward._householder_qr(jnp.asarray(w))
    np.testing.assert_allclose(q @ r, w, atol=tol(1e-5, 1e-12))
    if not dead_column:
        np.testing.assert_allclose(q.T @ q, np.eye(4), atol=tol(1e-5, 1e-12))
    np.testing.assert_array_equal(np.tril(np.asarray(r), -1), 0)
    np.testing.assert_allclose(np.abs(np.diag(r)), np.abs(np.diag(np.linalg.qr(w)[1])), atol=tol(1e-5, 1e-12))
    if not dead_column:
        g = np.asarray(jax.random.normal(jax.random.key(4), (2, 4, 3)), w.dtype)
        np.testing.assert_allclose(forward._solve_rows(r, jnp.einsum("hk,nk...->nh...", r, g)), g,
                                   rtol=tol(1e-4, 1e-10), atol=tol(1e-4, 1e-10))
