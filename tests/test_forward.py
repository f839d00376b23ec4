"""The forward Laplacian against the jacfwd reference, on networks, targets and arbitrary JAX code."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

import jsm
from jsm import forward, nets, objectives, targets

from conftest import tol


def reference(fn):
    """(value, Jacobian with the x axis first, Laplacian) by the obvious route: jacfwd of jacrev."""
    def ref(x):
        jac = jax.jacrev(fn)(x)  # fn(x).shape + (d,)
        hess = jax.jacfwd(jax.jacrev(fn))(x)  # fn(x).shape + (d, d)
        return fn(x), jnp.moveaxis(jac, -1, 0), jnp.trace(hess, axis1=-2, axis2=-1)
    return ref


def in_default_float(params):
    """Parameters in the default float type (float64 under JAX_ENABLE_X64), so gradients are too."""
    return jax.tree.map(lambda a: a.astype(jnp.zeros(()).dtype), params)


def mlp_energy(d=5):
    apply, params = nets.pure(nets.MLPEnergy(d, (16, 16), rngs=nnx.Rngs(1)))
    return apply, in_default_float(params)


# The rule table, one entry per class of primitive: every entry is checked (value, Jacobian, Laplacian)
# against jacfwd(jacrev). Affine ops (add, reshape, broadcast, slicing, concatenate, gather, scatter,
# pad, cumsum, select_n's branches, dot_general/mul/conv with one x-dependent operand), elementwise ops
# (their φ' and φ''), products of two x-dependent operands, div with x in the denominator (NOT bilinear:
# 1/b is elementwise in b), calls (jit, checkpoint, custom_vjp, custom_jvp), loops and the generic rule.
@jax.custom_vjp
def _sin(x):
    return jnp.sin(x)


_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


@jax.custom_jvp
def _softnorm(x):
    """sqrt(1 + |x|²) with a hand-written JVP: a custom_jvp that is not elementwise."""
    return jnp.sqrt(1 + jnp.sum(x * x))


_softnorm.defjvp(lambda primals, tangents: (_softnorm(primals[0]), primals[0] @ tangents[0] / _softnorm(primals[0])))

W = jnp.array([[0.5, -1.0, 0.3, 0.0, 0.2], [0.1, 0.4, -0.7, 1.2, 0.0], [-0.3, 0.2, 0.1, 0.5, 0.9]])

FUNCTIONS = {
    # x in a denominator: div(const, x-dependent) and div(x-dependent, x-dependent)
    "denominator": lambda x: 1 / (1 + x @ x) + jnp.sum(x / (1 + x**2)) + x[0] ** 2 / (1 + x[1] ** 2),
    "pow": lambda x: jnp.sum(jnp.abs(x) ** 2.5) + jnp.sum((1.5 + x**2) ** x) + jnp.sum(2.0 ** x),
    "integer_pow": lambda x: jnp.sum(x**3) + jnp.sum((2 + x**2) ** -2) + jnp.sum(jnp.square(x)),
    "max_min_clamp": lambda x: jnp.sum(jnp.maximum(x, 0.5 * x**2) + jnp.minimum(x**3, -x) + jnp.clip(x**2, 0.1, 0.5)),
    "select_n": lambda x: jnp.sum(jnp.where(x > 0, jnp.sin(x) * x, x**2)) + jnp.where(x[0] > x[1], x[2] ** 3, -x[3]),
    "transcendental": lambda x: jnp.sum(jnp.exp(x) + jnp.log(2 + x**2) + jnp.tanh(x) + jnp.sin(x) * jnp.cos(x)
                                        + jnp.log1p(x**2) + jnp.expm1(x) + jnp.sqrt(1 + x**2) + jax.lax.rsqrt(1 + x**2)
                                        + jax.scipy.special.erf(x) + jnp.arctan2(x, 2 + x**2) + jax.nn.sigmoid(x)),
    "dot_general": lambda x: x @ W.T @ W @ x + (W @ x) @ (W @ jnp.sin(x)) + jnp.einsum("i,ij,j", x, jnp.outer(x, x), x),
    "reductions": lambda x: jnp.sum(x) * jnp.mean(x**2) + jnp.prod(1 + x**2) + jnp.max(x**2) + jnp.min(jnp.sin(x))
                            + jax.nn.logsumexp(x) + jnp.linalg.norm(x),
    "broadcasting": lambda x: jnp.sum(jnp.tanh(x[:, None] * x[None, :] + W.T[:, :1])) + jnp.sum((x[:, None] - x[None, :]) ** 2),
    "concat_slicing": lambda x: jnp.sum(jnp.concatenate([x[:2], x[::-1] ** 2, jnp.sin(x[1:4])]) ** 3)
                                + jnp.sum(x.at[0].set(x[1] ** 2) ** 2) + jnp.sum(x[jnp.array([2, 0, 4])] ** 3)
                                + jnp.sum(jnp.cumsum(x) ** 2) + jnp.sum(jnp.pad(x, 1) * jnp.arange(7.0) ** 2)
                                + jnp.sum(jax.lax.dynamic_slice(x, (1,), (3,)) ** 3) + jnp.sum(x.reshape(5, 1).T ** 4),
    "fori_loop": lambda x: jax.lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y) * 1.5, x).sum(),
    "scan": lambda x: jax.lax.scan(lambda c, xi: (c * jnp.tanh(xi) + xi**2, c * xi), 1.0, x)[1].sum(),
    "conv": lambda x: jnp.sum(jnp.convolve(x, jnp.array([0.5, -1.0, 2.0])) ** 2) + jnp.sum(jnp.convolve(x, x) ** 2),
    "custom_jvp": lambda x: jnp.sum(jax.nn.relu(x) ** 2 + jax.nn.gelu(x) + jax.nn.silu(x) + jax.nn.softplus(x)) + _softnorm(x) ** 3,
    "sort_prod_norm": lambda x: jnp.sum(jnp.sort(x) ** 3) + jnp.prod(x) + jnp.linalg.norm(x),
    "products": lambda x: jax.nn.logsumexp(x) + jnp.sum(x * x) + (x @ x) * jnp.sin(x[0]),
    "calls": lambda x: jnp.sum(jax.jit(jnp.cosh)(x) * jax.checkpoint(jnp.tanh)(x)) + jnp.sum(_sin(x) ** 2),
    "vector_output": lambda x: jnp.tanh(jnp.outer(x, x[::-1]) @ x),
    "stop_gradient": lambda x: jnp.sum(x**3 * jax.lax.stop_gradient(x)),
    # The batch-shared Jacobian of x (the seed) through affine ops before any nonlinearity: a product with
    # constants, a bias, reversal, a slice, a convolution, x used twice (x + 2x; x @ W.T beside x itself).
    "shared_seed": lambda x: jnp.sum(jnp.tanh((x @ W.T + 1.0)[::-1]) ** 2)
                             + jnp.sum(jnp.convolve(x, jnp.array([0.5, -1.0, 2.0])) ** 3)
                             + jnp.sum((x + 2 * x)[1:3] ** 3) + jnp.sum(jnp.tanh(x @ W.T) * (x[:3] + 1)),
    "identity": lambda x: x,
}


@pytest.fixture(scope="module")
def points():
    """Three points, away from the kinks of max/min/clip/where and the sign changes of x."""
    return jax.random.normal(jax.random.key(0), (3, 5)) + 0.1


@pytest.mark.numerics
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_forward_jet_matches_reference_on_jax_code(name, points):
    """Every class of primitive against jacfwd(jacrev), on a batch of three (the folded affine rule)."""
    fn = FUNCTIONS[name]
    jet = jax.jit(forward.forward_jet_batch(fn))(points)
    want = jax.jit(jax.vmap(reference(fn)))(points)
    if name == "stop_gradient":  # d/dx of x³·sg(x) treats sg(x) as a constant c: 6 c x summed
        x = points
        want = (want[0], 3 * x**2 * x, 6 * jnp.sum(x * x, axis=-1))
    chex.assert_trees_all_equal_shapes(tuple(jet), tuple(want))
    for got, ref in zip(jet, want):
        np.testing.assert_allclose(got, ref, rtol=tol(2e-5, 1e-10), atol=tol(2e-5, 1e-10))


@pytest.mark.numerics
def test_forward_laplacian_of_targets_and_networks(mixture2, key):
    apply, params = mlp_energy()
    cases = [(mixture2.energy, mixture2.sample(key, 16)),
             (targets.Banana().energy, jax.random.normal(key, (16, 2))),
             (lambda x: apply(params, x), jax.random.normal(key, (16, 5)))]
    for energy, xs in cases:
        got = jax.jit(forward.forward_jet_batch(energy))(xs)
        want = jax.jit(jax.vmap(reference(energy)))(xs)
        for a, b in zip(got, (want[0], want[1], want[2])):
            np.testing.assert_allclose(a, b, rtol=tol(2e-5, 1e-10), atol=tol(2e-5, 1e-10))


@pytest.mark.numerics
def test_batch_and_per_example_jets_agree(key):
    apply, params = mlp_energy()
    xs = jax.random.normal(key, (6, 5))
    energy = lambda x: apply(params, x)
    batched = jax.jit(forward.forward_jet_batch(energy))(xs)
    vmapped = jax.jit(jax.vmap(forward.forward_jet(energy)))(xs)
    for a, b in zip(batched, vmapped):
        np.testing.assert_allclose(a, b, rtol=tol(1e-6, 1e-12), atol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_parameter_gradient_of_the_laplacian_matches_jacfwd(key):
    """The jet is differentiable in what the function closes over: ∇_θ Σ_i Δf_θ(x_i)."""
    apply, params = mlp_energy()
    xs = jax.random.normal(key, (6, 5))
    fwd = lambda p: jnp.sum(forward.forward_jet_batch(lambda x: apply(p, x))(xs).laplacian)
    ref = lambda p: jnp.sum(jax.vmap(jsm.laplacian(lambda x: apply(p, x), "jacfwd"))(xs))
    got, want = jax.jit(jax.grad(fwd))(params), jax.jit(jax.grad(ref))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_ism_is_the_same_loss_and_gradient_for_every_method(key):
    """ISM's default ("auto" = forward) against the jacfwd reference, for an energy model
    (`ism_energy`: the second-order jet of f) and for a score network (`ism`: first-order jet)."""
    apply, params = mlp_energy()
    s_apply, s_params = nets.pure(nets.MLPScore(5, (16, 16), rngs=nnx.Rngs(2)))
    s_params = in_default_float(s_params)
    xs = jax.random.normal(key, (8, 5))
    for loss_fn, p in [(lambda p, m: objectives.ism_energy(lambda x: apply(p, x), xs, method=m), params),
                       (lambda p, m: objectives.ism(lambda x: s_apply(p, x), xs, method=m), s_params)]:
        loss = {m: jax.jit(jax.value_and_grad(lambda p: loss_fn(p, m)))(p) for m in ("auto", "jacfwd", "jacrev")}
        for m in ("auto", "jacrev"):
            np.testing.assert_allclose(loss[m][0], loss["jacfwd"][0], rtol=tol(1e-5, 1e-11), atol=tol(1e-6, 1e-12))
            for a, b in zip(jax.tree.leaves(loss[m][1]), jax.tree.leaves(loss["jacfwd"][1])):
                np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_forward_laplacian_equals_folx(key):
    """The peer implementation (Li et al.'s folx) on an MLP energy: the same ∇f and Δf up to round-off."""
    folx = pytest.importorskip("folx")
    apply, params = mlp_energy()
    energy = lambda x: apply(params, x)
    xs = jax.random.normal(key, (6, 5))
    ours = jax.jit(forward.forward_jet_batch(energy))(xs)
    theirs = jax.jit(jax.vmap(folx.forward_laplacian(energy)))(xs)
    chex.assert_shape(ours.laplacian, (6,))
    np.testing.assert_allclose(ours.value, theirs.x, rtol=tol(1e-6, 1e-12))
    np.testing.assert_allclose(ours.jacobian, theirs.jacobian.dense_array, rtol=tol(1e-5, 1e-11), atol=tol(1e-6, 1e-12))
    np.testing.assert_allclose(ours.laplacian, theirs.laplacian, rtol=tol(1e-5, 1e-11), atol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_functions_without_a_derivative_in_x_get_zero_jets():
    """Through stop_gradient, through integers (argmax), or not depending on x at all."""
    xs = jnp.array([[0.5, -1.0, 2.0], [3.0, 0.0, 1.0]])
    for fn, value in [(lambda x: jnp.sum(jax.lax.stop_gradient(x)), xs.sum(1)),
                      (lambda x: jnp.argmax(x).astype(xs.dtype), jnp.array([2.0, 0.0])),
                      (lambda x: jnp.asarray(2.0, xs.dtype), jnp.array([2.0, 2.0]))]:
        jet = forward.forward_jet_batch(fn)(xs)
        np.testing.assert_array_equal(jet.value, value)
        np.testing.assert_array_equal(jet.jacobian, jnp.zeros((2, 3)))
        np.testing.assert_array_equal(jet.laplacian, jnp.zeros(2))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"x must be ONE example of shape \(d,\), \(h, w, c\) .*got a scalar"):
        forward.forward_jet(jnp.sum)(jnp.zeros(()))
    for make in (forward.forward_jet_batch, forward.laplacian_batch, forward.divergence_batch):
        with pytest.raises(ValueError, match=r"xs must be a batch of shape \(n, \*shape\), .*got shape \(3,\)"):
            make(jnp.sum)(jnp.zeros(3))
    with pytest.raises(ValueError, match="fn must return one array, got 2 outputs"):
        forward.forward_jet(lambda x: (x, x))(jnp.zeros(3))
    with pytest.raises(ValueError, match=r"fn must map one example of shape \(2, 3\) to the same shape, got shape \(6,\)"):
        forward.divergence_batch(lambda x: x.reshape(-1))(jnp.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match=r"fn must map one example of shape \(2, 3\) to the same shape, got shape \(3, 2\)"):
        forward.divergence_batch(lambda x: x.T)(jnp.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match=r"fn must return one array for one example of shape \(3,\), got a tuple"):
        forward.divergence_batch(lambda x: (x, x))(jnp.zeros((4, 3)))


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_jets_of_image_shaped_examples(chunk_size, key):
    """An example of shape (2, 3, 2) is its 12 entries: the jets, Laplacians and divergences equal
    the brute-force ones of the hand-flattened function (jacrev, jacfwd(jacrev)), and Jacobians
    come back as (n, 2, 3, 2, ...), equal to jax.jacrev on the image itself. fn has a vector
    output and the field a non-symmetric Jacobian, so a transposed or partial flattening shows."""
    shape = (2, 3, 2)
    w = jax.random.normal(jax.random.key(4), (12, 4))
    fn = lambda x: jnp.tanh(x.reshape(-1) @ w) * jnp.sum(jnp.cumsum(x, axis=1) ** 2)  # (2, 3, 2) -> (4,)
    field = lambda x: jnp.sin(jnp.cumsum(x, axis=2)) * x[:, ::-1] + jnp.cumsum(x, axis=0) ** 2  # -> (2, 3, 2)
    xs = jax.random.normal(key, (3, *shape))
    flat = lambda g: (lambda z: g(z.reshape(shape)).reshape(-1))

    @jax.jit
    def jets(xs):
        return (forward.forward_jet_batch(fn, chunk_size=chunk_size)(xs), jax.vmap(forward.forward_jet(fn, chunk_size=chunk_size))(xs),
                forward.laplacian_batch(fn, chunk_size=chunk_size)(xs), forward.divergence_batch(field, chunk_size=chunk_size)(xs))

    jet, vmapped, lap, (value, div) = jets(xs)
    _, _, want_lap = jax.vmap(reference(flat(fn)))(xs.reshape(3, -1))
    want_jac = jnp.moveaxis(jax.vmap(jax.jacrev(fn))(xs), 1, -1)  # (n, 4, 2, 3, 2) -> (n, 2, 3, 2, 4)
    want_div = jax.vmap(lambda z: jnp.trace(jax.jacfwd(flat(field))(z)))(xs.reshape(3, -1))
    chex.assert_shape((jet.value, jet.jacobian, jet.laplacian, lap, value, div),
                      [(3, 4), (3, *shape, 4), (3, 4), (3, 4), (3, *shape), (3,)])
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=tol(1e-5, 1e-11), atol=tol(1e-5, 1e-11))
    for got in (jet, vmapped):
        close(got.value, jax.vmap(fn)(xs))
        close(got.jacobian, want_jac)
        close(got.laplacian, want_lap)
    close(lap, want_lap)
    close(value, jax.vmap(field)(xs))
    close(div, want_div)


def _chunked_cases():
    apply, params = mlp_energy()
    return [(lambda x: apply(params, x), "mlp"), (FUNCTIONS["shared_seed"], "shared_seed"),
            (FUNCTIONS["vector_output"], "vector_output")]


@pytest.mark.numerics
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 8])
def test_chunked_jets_equal_unchunked(chunk_size, points):
    """Columns pushed in blocks (the last one padded when chunk_size does not divide d = 5)."""
    for fn, _ in _chunked_cases():
        whole = jax.jit(forward.forward_jet_batch(fn))(points)
        chunked = jax.jit(forward.forward_jet_batch(fn, chunk_size=chunk_size))(points)
        lap = jax.jit(forward.laplacian_batch(fn, chunk_size=chunk_size))(points)
        chex.assert_trees_all_equal_shapes(tuple(chunked), tuple(whole))
        for a, b in zip((*chunked, lap), (*whole, whole.laplacian)):
            np.testing.assert_allclose(a, b, rtol=tol(1e-5, 1e-12), atol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_chunked_divergence_and_its_parameter_gradient(key):
    """divergence_batch (the trace summed block by block) against jacfwd, and ∇_θ through the
    rematerialised lax.map against the unchunked jet."""
    s_apply, s_params = nets.pure(nets.MLPScore(5, (16, 16), rngs=nnx.Rngs(2)))
    s_params = in_default_float(s_params)
    xs = jax.random.normal(key, (4, 5))
    want = jax.vmap(lambda x: jnp.trace(jax.jacfwd(lambda z: s_apply(s_params, z))(x)))(xs)
    for c in (None, 2, 3):
        value, div = jax.jit(forward.divergence_batch(lambda x: s_apply(s_params, x), chunk_size=c))(xs)
        np.testing.assert_allclose(div, want, rtol=tol(1e-5, 1e-11), atol=tol(1e-6, 1e-12))
        np.testing.assert_allclose(value, jax.vmap(lambda x: s_apply(s_params, x))(xs), rtol=tol(1e-6, 1e-12))
    apply, params = mlp_energy()
    loss = lambda p, c: jnp.sum(forward.laplacian_batch(lambda x: apply(p, x), chunk_size=c)(xs) ** 2)
    got, ref = jax.jit(jax.grad(lambda p: loss(p, 2)))(params), jax.jit(jax.grad(lambda p: loss(p, None)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))


@pytest.mark.numerics
def test_vmapped_jets_take_the_folded_path_and_differentiate(key):
    """jax.vmap of the per-example jet IS the batched jet (custom_vmap): the same values, ONE
    (n·d, h) product per layer in its jaxpr, and parameter gradients (grad outside the vmap) equal
    to jacfwd's. Reverse mode inside the vmap (per-example ∇_x Δf) and a vmap over an ensemble's
    parameters take the per-example route, and are right too."""
    apply, params = mlp_energy()
    xs = jax.random.normal(key, (6, 5))
    lap = lambda p: jsm.laplacian(lambda x: apply(p, x), "forward")
    vmapped = jax.jit(jax.vmap(lap(params)))(xs)
    np.testing.assert_allclose(vmapped, forward.laplacian_batch(lambda x: apply(params, x))(xs),
                               rtol=tol(1e-6, 1e-12), atol=tol(1e-6, 1e-12))
    jaxpr = jax.make_jaxpr(jax.vmap(lap(params)))(xs).jaxpr
    assert not any(e.primitive.name == "custom_vmap_call" for e in jaxpr.eqns)
    assert (6 * 5, 16) in {tuple(e.invars[0].aval.shape) for e in jaxpr.eqns if e.primitive.name == "dot_general"}
    fwd = lambda p: jnp.sum(jax.vmap(lap(p))(xs) ** 2)
    ref = lambda p: jnp.sum(jax.vmap(jsm.laplacian(lambda x: apply(p, x), "jacfwd"))(xs) ** 2)
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(fwd))(params)), jax.tree.leaves(jax.jit(jax.grad(ref))(params))):
        np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))
    # The divergence of a score network, vmapped and differentiated in its parameters.
    s_apply, s_params = nets.pure(nets.MLPScore(5, (16, 16), rngs=nnx.Rngs(2)))
    s_params = in_default_float(s_params)
    div = lambda p, m: jnp.sum(jax.vmap(jsm.divergence(lambda x: s_apply(p, x), m))(xs) ** 2)
    np.testing.assert_allclose(div(s_params, "forward"), div(s_params, "jacfwd"), rtol=tol(1e-5, 1e-11))
    got, want = jax.jit(jax.grad(div), static_argnums=1)(s_params, "forward"), jax.grad(div)(s_params, "jacfwd")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-6, 1e-12))
    # Reverse mode inside the vmap: ∇_x Δf per example.
    got = jax.jit(jax.vmap(jax.grad(lap(params))))(xs)
    want = jax.vmap(jax.grad(jsm.laplacian(lambda x: apply(params, x), "jacfwd")))(xs)
    np.testing.assert_allclose(got, want, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))
    # An ensemble: the parameters batched too.
    ensemble = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    got = jax.jit(jax.vmap(lambda p: jax.vmap(lap(p))(xs)))(ensemble)
    want = jax.vmap(lambda p: jax.vmap(jsm.laplacian(lambda x: apply(p, x), "jacfwd"))(xs))(ensemble)
    np.testing.assert_allclose(got, want, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))
    # Parameters and x batched by the same vmap (one member per example): the per-example route.
    got = jax.jit(jax.vmap(lambda p, x: lap(p)(x)))(ensemble, xs[:2])
    np.testing.assert_allclose(got, jnp.diagonal(want[:, :2]), rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))


def test_bad_chunk_size_names_the_argument():
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1 or None, got 0"):
        forward.forward_jet_batch(jnp.sum, chunk_size=0)
    with pytest.raises(ValueError, match='chunk_size applies to method="forward"'):
        jsm.laplacian(jnp.sum, "jacfwd", chunk_size=2)


def _dot_sizes(jaxpr) -> set[int]:
    """The axis sizes of the operands of every matrix product in a jaxpr, nested calls included."""
    sizes = {k for e in jaxpr.eqns if e.primitive.name == "dot_general" for v in e.invars for k in v.aval.shape}
    return sizes.union(*(_dot_sizes(sub) for sub in jcore.subjaxprs(jaxpr)))


def _first_layer_nets(d=12, h=5):
    """An MLPEnergy (x @ W, h = 5 first) and a hand-written tanh MLP (W @ x: x the product's
    second operand, W (h, d)), both with d > h, and the tanh MLP on a (3, 4) image (reshaped)."""
    apply, params = nets.pure(nets.MLPEnergy(d, (h, 7), rngs=nnx.Rngs(3)))
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    tanh_params = in_default_float({"w1": jax.random.normal(k1, (h, d)) / 2, "b1": jnp.linspace(-1, 1, h),
                                    "w2": jax.random.normal(k2, (6, h)), "w3": jax.random.normal(k3, (6,))})
    tanh_mlp = lambda p, x: p["w3"] @ jnp.tanh(p["w2"] @ jnp.tanh(p["w1"] @ x + p["b1"]))
    return [("mlp_energy", apply, in_default_float(params), (d,)), ("tanh_mlp", tanh_mlp, tanh_params, (d,)),
            ("tanh_mlp_image", lambda p, x: tanh_mlp(p, x.reshape(-1)), tanh_params, (3, 4))]


@pytest.mark.numerics
@pytest.mark.parametrize("case", range(3), ids=["mlp_energy", "tanh_mlp", "tanh_mlp_image"])
def test_laplacian_seeds_the_first_layer_when_it_is_narrower_than_x(case, key):
    """x enters f only through z = x W, W (d, h), d = 12 > h = 5: laplacian_batch pushes h rows of
    S = QᵀW = R (W = QR) from z instead of d rows of I from x. The result equals tr(jax.hessian), the
    d-row path (`_reduce=False`), the chunked path (blocks of R's rows, the last one padded) and the
    vmapped per-example Laplacian, whose jaxprs hold (n·h, ·) products and no (n·d, ·) one; the
    parameter gradient of the mean Laplacian equals jacfwd's."""
    _, apply, params, shape = _first_layer_nets()[case]
    n, d, h = 4, 12, 5
    xs = jax.random.normal(key, (n, *shape))
    f = lambda p: (lambda x: apply(p, x))
    paths = {"reduced": lambda p, xs: forward.laplacian_batch(f(p))(xs),
             "d_rows": lambda p, xs: forward.laplacian_batch(f(p), _reduce=False)(xs),
             "chunked": lambda p, xs: forward.laplacian_batch(f(p), chunk_size=2)(xs),
             "vmapped": lambda p, xs: jax.vmap(jsm.laplacian(f(p), "forward"))(xs)}
    hessian = lambda x: jnp.trace(jax.hessian(lambda z: f(params)(z.reshape(shape)))(x.reshape(-1)))
    want = jax.vmap(hessian)(xs)
    got = jax.jit(lambda p, xs: {k: g(p, xs) for k, g in paths.items()})(params, xs)
    for name, lap in got.items():
        np.testing.assert_allclose(lap, want, rtol=tol(2e-5, 1e-11), atol=tol(2e-5, 1e-11), err_msg=name)
    for name in ("reduced", "vmapped"):  # no lax.cond: the seed serves a W of any rank
        sizes = _dot_sizes(jax.make_jaxpr(paths[name])(params, xs).jaxpr)
        assert n * h in sizes and n * d not in sizes, name
    assert n * d in _dot_sizes(jax.make_jaxpr(paths["d_rows"])(params, xs).jaxpr)
    mean = lambda p, m: jnp.mean(jax.vmap(jsm.laplacian(f(p), m))(xs))
    grads = jax.jit(lambda p: (jax.grad(lambda q: jnp.mean(paths["reduced"](q, xs)))(p), jax.grad(mean)(p, "forward"),
                               jax.grad(mean)(p, "jacfwd")))(params)
    for a, b, c in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(a, c, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))
        np.testing.assert_allclose(b, c, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))


@pytest.mark.numerics
def test_a_rank_deficient_first_layer_keeps_the_seed_and_a_finite_gradient(key):
    """W with a zero column (a dead first-layer unit): QR's derivative would divide by R's zero
    diagonal; the seed's QR is a value only (S = QᵀW carries d(WᵀW)), so the seeded Laplacian gives
    the Hessian's trace and jacfwd's gradient at any rank."""
    _, apply, params, _ = _first_layer_nets()[1]
    params = dict(params, w1=params["w1"].at[2].set(0.0))  # W = w1ᵀ (12, 5) of rank 4
    w = params["w1"].T
    assert bool(forward._full_rank(w.at[:, 2].set(1e-2))) and not bool(forward._full_rank(w))
    xs = jax.random.normal(key, (4, 12))
    mean = lambda p, m: jnp.mean(jax.vmap(jsm.laplacian(lambda x: apply(p, x), m))(xs))
    want = jax.vmap(lambda x: jnp.trace(jax.hessian(lambda z: apply(params, z))(x)))(xs)
    got = jax.jit(forward.laplacian_batch(lambda x: apply(params, x)))(xs)
    np.testing.assert_allclose(got, want, rtol=tol(2e-5, 1e-11), atol=tol(2e-5, 1e-11))
    g_forward, g_jacfwd = jax.jit(lambda p: (jax.grad(mean)(p, "forward"), jax.grad(mean)(p, "jacfwd")))(params)
    for a, b in zip(jax.tree.leaves(g_forward), jax.tree.leaves(g_jacfwd), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=tol(1e-4, 1e-10), atol=tol(1e-5, 1e-12))


@pytest.mark.numerics
def test_laplacian_keeps_the_identity_seed_otherwise(key):
    """A first layer at least as wide as x (h = 12 >= d = 12, h = 16 > d = 5): the jaxpr is the
    d-row one. x used twice (f(x) = mlp(x) + |x|², and x W beside W' x) at d > h: the same, and right."""
    apply, params = mlp_energy()  # d = 5, h = 16
    wide, wide_params = nets.pure(nets.MLPEnergy(12, (12,), rngs=nnx.Rngs(0)))
    narrow, narrow_params = nets.pure(nets.MLPEnergy(12, (3, 3), rngs=nnx.Rngs(0)))
    narrow_params = in_default_float(narrow_params)
    v = jax.random.normal(jax.random.key(6), (3, 12))
    cases = [(lambda x: apply(params, x), 5), (lambda x: wide(wide_params, x), 12),
             (lambda x: narrow(narrow_params, x) + x @ x, 12),
             (lambda x: narrow(narrow_params, x) * jnp.sum(jnp.sin(v @ x)), 12)]
    for i, (f, d) in enumerate(cases):
        xs = jax.random.normal(key, (3, d))
        for chunk_size in (None, 2):
            jaxprs = [str(jax.make_jaxpr(forward.laplacian_batch(f, chunk_size=chunk_size, _reduce=r))(xs))
                      for r in (True, False)]
            assert jaxprs[0] == jaxprs[1], (i, chunk_size)
        if i >= 2:
            want = jax.vmap(lambda x, f=f: jnp.trace(jax.hessian(f)(x)))(xs)
            np.testing.assert_allclose(jax.jit(forward.laplacian_batch(f))(xs), want, rtol=tol(2e-5, 1e-11),
                                       atol=tol(2e-5, 1e-11))
