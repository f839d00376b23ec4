"""The exact Hessian and Jacobian diagonals against jax.hessian / jax.jacfwd, and regularised score matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsm
from jsm import forward, nets, objectives

from conftest import tol
from test_forward import FUNCTIONS, in_default_float, points  # noqa: F401  (points: the rule table's fixture)


def hessian_diagonal_reference(fn):
    """∂²fn/∂x_k² with x's axis first, by the obvious route: the diagonal of jacfwd(jacrev)."""
    def ref(x):
        hess = jax.jacfwd(jax.jacrev(fn))(x)  # fn(x).shape + (d, d)
        return jnp.moveaxis(jnp.diagonal(hess, axis1=-2, axis2=-1), -1, 0)
    return ref


@pytest.mark.numerics
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_the_diagonal_matches_the_hessian_on_every_rule(name, points):
    """Every class of primitive the Laplacian's rule table covers: value, gradient and diagonal."""
    fn = FUNCTIONS[name]
    out = jax.jit(forward.hessian_diagonal_batch(fn))(points)
    want = jax.jit(jax.vmap(hessian_diagonal_reference(fn)))(points)
    np.testing.assert_allclose(out.value, jax.vmap(fn)(points), rtol=tol(1e-5, 1e-12), atol=tol(1e-5, 1e-12))
    np.testing.assert_allclose(out.diagonal, want, rtol=tol(2e-4, 1e-10), atol=tol(2e-4, 1e-10))
    # the diagonal sums to the Laplacian
    lap = jax.jit(lambda xs: forward.forward_jet_batch(fn)(xs).laplacian)(points)
    np.testing.assert_allclose(jnp.sum(out.diagonal, axis=1), lap, rtol=tol(2e-4, 1e-10), atol=tol(2e-4, 1e-10))


@pytest.fixture(scope="module")
def energy_net():
    apply, params = nets.pure(nets.MLPEnergy(6, (16, 16), rngs=nnx.Rngs(3)))
    return apply, in_default_float(params)


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["forward", "jacfwd", "jacrev"])
def test_hessian_and_jacobian_diagonals_of_networks(method, energy_net):
    apply, params = energy_net
    xs = jax.random.normal(jax.random.key(1), (4, 6))
    f = lambda x: apply(params, x)
    want = jax.vmap(lambda x: jnp.diag(jax.hessian(f)(x)))(xs)
    np.testing.assert_allclose(jax.jit(jax.vmap(jsm.hessian_diagonal(f, method)))(xs), want, rtol=tol(1e-4, 1e-10),
                               atol=tol(1e-5, 1e-12))
    s = jsm.score_of(f)
    np.testing.assert_allclose(jax.jit(jax.vmap(jsm.jacobian_diagonal(s, method)))(xs), -want, rtol=tol(1e-4, 1e-10),
                               atol=tol(1e-5, 1e-12))


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_images_chunks_and_parameter_gradients(chunk_size, energy_net):
    """An image-shaped example (2, 3) is its 6 entries; chunks change nothing; d(loss)/dθ matches jacfwd's."""
    apply, params = energy_net
    xs = jax.random.normal(jax.random.key(2), (3, 2, 3))
    f_img = lambda p, x: apply(p, x.reshape(-1))
    got = jax.jit(jax.vmap(jsm.hessian_diagonal(lambda x: f_img(params, x), chunk_size=chunk_size)))(xs)
    want = jax.vmap(lambda x: jnp.diag(jax.hessian(lambda z: f_img(params, z.reshape(2, 3)))(x.reshape(-1))))(xs)
    assert got.shape == (3, 2, 3)
    np.testing.assert_allclose(got.reshape(3, -1), want, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))
    loss = lambda p: jnp.sum(forward.hessian_diagonal_batch(lambda x: f_img(p, x), chunk_size=chunk_size)(xs).diagonal ** 2)
    ref = lambda p: jnp.sum(jax.vmap(jsm.hessian_diagonal(lambda x: f_img(p, x), "jacfwd"))(xs) ** 2)
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss))(params)), jax.tree.leaves(jax.jit(jax.grad(ref))(params))):
        np.testing.assert_allclose(a, b, rtol=tol(1e-3, 1e-9), atol=tol(1e-4, 1e-10))
    v = lambda x: jnp.tanh(x[::-1] * jnp.arange(1.0, 7.0).reshape(2, 3)) * x
    got = jax.jit(forward.jacobian_diagonal_batch(v, chunk_size=chunk_size))(xs)[1]
    want = jax.vmap(lambda x: jnp.diag(jax.jacfwd(lambda z: v(z.reshape(2, 3)).reshape(-1))(x.reshape(-1))))(xs)
    np.testing.assert_allclose(got.reshape(3, -1), want, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))


# --- regularised score matching (Kingma & LeCun 2010) ---------------------------------------


def test_a_zero_penalty_is_the_plain_loss_bit_for_bit(energy_net):
    apply, params = energy_net
    xs = jax.random.normal(jax.random.key(4), (5, 6))
    f = lambda x: apply(params, x)
    s = jsm.score_of(f)
    same = lambda a, b: np.testing.assert_array_equal(jax.jit(a)(xs), jax.jit(b)(xs))
    same(lambda xs: objectives.ism_energy(f, xs, hessian_penalty=0.0), lambda xs: objectives.ism_energy(f, xs))
    same(lambda xs: objectives.ism_energy(f, xs, hessian_penalty=0), lambda xs: objectives.ism_energy(f, xs))
    same(lambda xs: objectives.ism(s, xs, hessian_penalty=0.0), lambda xs: objectives.ism(s, xs))
    same(lambda xs: objectives.ism_energy_per_example(f, xs[0], hessian_penalty=0.0),
         lambda xs: objectives.ism_energy_per_example(f, xs[0]))
    same(lambda xs: objectives.ism_per_example(s, xs[0], hessian_penalty=0.0), lambda xs: objectives.ism_per_example(s, xs[0]))


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["auto", "jacfwd"])
def test_the_penalised_losses_equal_their_equations(method, energy_net):
    """mean[1/2 |∇f|² - Δf + λ Σ_k (∂²f/∂x_k²)²] and mean[1/2 |s|² + tr ∂s/∂x + λ Σ_k (∂s_k/∂x_k)²],
    written out with jax.hessian and jax.jacfwd; and their parameter gradients."""
    apply, params = energy_net
    xs = jax.random.normal(jax.random.key(5), (5, 6))
    lam = 0.3

    def by_hand(p):
        f = lambda x: apply(p, x)
        g, h = jax.vmap(jax.grad(f))(xs), jax.vmap(jax.hessian(f))(xs)
        diag = jnp.diagonal(h, axis1=1, axis2=2)
        return jnp.mean(0.5 * jnp.sum(g**2, 1) - jnp.sum(diag, 1) + lam * jnp.sum(diag**2, 1))

    loss = lambda p: objectives.ism_energy(lambda x: apply(p, x), xs, method, hessian_penalty=lam)
    np.testing.assert_allclose(jax.jit(loss)(params), by_hand(params), rtol=tol(1e-5, 1e-11))
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(loss))(params)), jax.tree.leaves(jax.jit(jax.grad(by_hand))(params))):
        np.testing.assert_allclose(a, b, rtol=tol(1e-3, 1e-9), atol=tol(1e-5, 1e-11))
    per_example = jax.jit(jax.vmap(lambda x: objectives.ism_energy_per_example(lambda z: apply(params, z), x, method,
                                                                       hessian_penalty=lam)))(xs)
    np.testing.assert_allclose(jnp.mean(per_example), by_hand(params), rtol=tol(1e-5, 1e-11))

    v = lambda x: jnp.tanh(x @ params_matrix(params)) @ params_matrix(params).T - x**3
    jac = jax.vmap(jax.jacfwd(v))(xs)
    diag = jnp.diagonal(jac, axis1=1, axis2=2)
    want = jnp.mean(0.5 * jnp.sum(jax.vmap(v)(xs) ** 2, 1) + jnp.sum(diag, 1) + lam * jnp.sum(diag**2, 1))
    np.testing.assert_allclose(jax.jit(lambda xs: objectives.ism(v, xs, method, hessian_penalty=lam))(xs), want,
                               rtol=tol(1e-5, 1e-11))


def params_matrix(params):
    """A (6, 16) weight matrix of the energy net, to build a score network that is not a gradient."""
    return next(leaf for leaf in jax.tree.leaves(params) if leaf.shape == (6, 16))


def test_a_traced_penalty_compiles_once_and_a_negative_one_is_refused(energy_net, compilations):
    apply, params = energy_net
    xs = jax.random.normal(jax.random.key(6), (5, 6))
    step = jax.jit(lambda p, lam: objectives.ism_energy(lambda x: apply(p, x), xs, hessian_penalty=lam))
    small, large = step(params, 0.01), None
    warm = len(compilations)
    large = step(params, 10.0)
    assert len(compilations) == warm and float(large) > float(small)
    with pytest.raises(ValueError, match="hessian_penalty must be a number >= 0"):
        objectives.ism_energy(lambda x: apply(params, x), xs, hessian_penalty=-1.0)
