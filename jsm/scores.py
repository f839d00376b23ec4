"""Scores and their exact traces.

The score of q(x) = exp(-f(x)) / Z is s(x) = ∇ log q(x) = -∇f(x): the
intractable Z drops out. Implicit score matching needs the divergence
tr(∂s/∂x) of a vector field, or the Laplacian Δf = tr(∇²f) of an energy,
exactly. Every function here acts on ONE example x of shape (d,); batch with
`jax.vmap`.

Exact methods (`EXACT_METHODS`):
  "jacfwd"  the reference: the full d x d Jacobian by forward mode, then its trace.
  "jacrev"  the same Jacobian by reverse mode (d VJPs); cheaper when a pass is
            dominated by a wide first layer.
Estimators are kept apart, under their own names, and are never a default:
`hutchinson_divergence` is unbiased but noisy, with variance that grows with d.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jsm import _validate

Array = jax.Array
EnergyFn = Callable[[Array], Array]
VectorFn = Callable[[Array], Array]

EXACT_METHODS = ("jacfwd", "jacrev")
PROBES = ("rademacher", "gaussian")


def _example(x: Array) -> None:
    if jnp.ndim(x) != 1:
        raise ValueError(
            f"x must be ONE example of shape (d,), got shape {jnp.shape(x)}; batch with jax.vmap"
        )


def score_of(energy: EnergyFn) -> VectorFn:
    """s(x) = -∇f(x), the score of exp(-f(x)) / Z, for x of shape (d,)."""
    grad_f = jax.grad(energy)

    def score(x: Array) -> Array:
        _example(x)
        return -grad_f(x)

    return score


def divergence(vector_fn: VectorFn, method: str = "jacfwd") -> Callable[[Array], Array]:
    """x -> tr(∂v/∂x) = Σ_i ∂v_i/∂x_i, exactly.

    Args:
      vector_fn: v, a map (d,) -> (d,).
      method: one of `EXACT_METHODS`.

    Returns:
      A function of x with shape (d,) returning a scalar.
    """
    _validate.choice("method", method, EXACT_METHODS)
    jacobian = jax.jacfwd(vector_fn) if method == "jacfwd" else jax.jacrev(vector_fn)

    def div(x: Array) -> Array:
        _example(x)
        return jnp.trace(jacobian(x))

    return div


def laplacian(energy: EnergyFn, method: str = "jacfwd") -> Callable[[Array], Array]:
    """x -> Δf(x) = Σ_i ∂²f/∂x_i², exactly: the divergence of ∇f.

    Note tr(∂s/∂x) = -Δf for the score s = -∇f.
    """
    return divergence(jax.grad(energy), method)


def hutchinson_divergence(
    vector_fn: VectorFn, n_probes: int = 1, probe: str = "rademacher"
) -> Callable[[Array, Array], Array]:
    """An ESTIMATOR of tr(∂v/∂x): (x, key) -> mean_j u_j^T (∂v/∂x) u_j, E[u u^T] = I.

    Unbiased; its variance is 2 Σ_{i≠j} J_ij² / n_probes for Rademacher probes
    (plus 2 Σ_i J_ii² for Gaussian ones). Each probe costs one JVP. For comparison
    with the exact methods only.
    """
    n_probes = _validate.positive_int("n_probes", n_probes)
    _validate.choice("probe", probe, PROBES)

    def estimate(x: Array, key: Array) -> Array:
        _example(x)
        shape = (n_probes, x.shape[0])
        if probe == "rademacher":
            u = jax.random.rademacher(key, shape, x.dtype)
        else:
            u = jax.random.normal(key, shape, x.dtype)
        jvp = lambda ui: jax.jvp(vector_fn, (x,), (ui,))[1]
        return jnp.mean(jnp.sum(u * jax.vmap(jvp)(u), axis=-1))

    return estimate
