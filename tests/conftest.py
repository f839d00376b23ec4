"""Shared fixtures. Targets are built once per session so jitted functions compile once.

The `numerics` tests (closed forms, exact references) also run under JAX_ENABLE_X64=1
(`make test` does both); `tol(float32, float64)` gives a comparison limited by round-off
the tolerance of the precision in force. Comparisons limited by something else
(quadrature, Monte Carlo) keep one tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import targets

X64 = bool(jax.config.jax_enable_x64)
FLOAT = jnp.zeros(()).dtype  # the default float: float32, or float64 under JAX_ENABLE_X64


def assert_same_params(a, b):
    """Two pytrees (parameters, optimizer states) bitwise equal, leaf by leaf."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def tol(float32: float, float64: float) -> float:
    """A round-off-limited tolerance: `float64` when JAX_ENABLE_X64=1, else `float32`."""
    return float64 if X64 else float32


@pytest.fixture(scope="session")
def gaussian2():
    return targets.Gaussian(jnp.array([1.0, -1.0]), jnp.array([[1.0, 0.5], [0.5, 2.0]]))


@pytest.fixture(scope="session")
def mixture2():
    means = jnp.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0]])
    return targets.GaussianMixture(means, jnp.array([0.5, 0.8, 0.4]), jnp.array([0.2, 0.5, 0.3]))


def all_targets():
    """One of each target family, with a name for test ids."""
    return {
        "gaussian3": targets.Gaussian(
            jnp.array([0.5, -1.0, 2.0]),
            jnp.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 0.5]]),
        ),
        "mixture": targets.GaussianMixture(
            jnp.array([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0]]),
            jnp.array([0.5, 0.8, 0.4]),
            jnp.array([0.2, 0.5, 0.3]),
        ),
        "ring": targets.Ring(8, radius=2.0, scale=0.3),
        "banana": targets.Banana(scale=1.0, curvature=0.5, width=0.5),
        "funnel": targets.Funnel(dim=5, scale=1.5),
    }


@pytest.fixture(scope="session")
def key():
    return jax.random.key(20261125)


def grid_2d(lo, hi, n):
    """Cell centres of an n x n grid over [lo, hi]^2 and the cell area."""
    edges = [np.linspace(a, b, n + 1) for a, b in zip(lo, hi)]
    centres = [(e[1:] + e[:-1]) / 2 for e in edges]
    xx, yy = np.meshgrid(*centres, indexing="ij")
    area = np.prod([(b - a) / n for a, b in zip(lo, hi)])
    return np.stack([xx.ravel(), yy.ravel()], axis=-1), area, edges


@pytest.fixture
def compilations():
    """The XLA compilations made while the test runs, counted through jax.monitoring."""
    events = []

    def listen(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)
