"""Figures for 2-D densities, energies, score fields, samples and loss curves.

Each function draws on a matplotlib `Axes` and returns it; `save` writes a
figure as PNG. Functions of x are evaluated on a grid with one jitted vmap.
Matplotlib runs headless (Agg) unless a backend was chosen already.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import matplotlib

if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "contours", "density", "energy", "figure", "grid", "loss_curve", "samples", "save", "scalar_field",
    "score_field",
]

Array = jax.Array


def grid(lo: Sequence[float], hi: Sequence[float], n: int) -> tuple[np.ndarray, np.ndarray, Array]:
    """xx, yy of shape (n, n) and the points (n*n, 2) of a regular grid over [lo, hi]."""
    xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    xx, yy = np.meshgrid(xs, ys)
    return xx, yy, jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)


def scalar_field(ax, fn: Callable[[Array], Array], lo, hi, n: int = 200, cmap: str = "viridis",
                 title=None, colorbar: bool = False, transform=None):
    """A heat map of a scalar function of x on [lo, hi] (optionally of transform(values))."""
    xx, yy, pts = grid(lo, hi, n)
    values = np.asarray(jax.jit(jax.vmap(fn))(pts)).reshape(n, n)
    mesh = ax.pcolormesh(xx, yy, values if transform is None else transform(values), cmap=cmap, shading="auto")
    if colorbar:
        plt.colorbar(mesh, ax=ax, fraction=0.046)
    return _finish(ax, title)


def density(ax, log_prob_fn: Callable[[Array], Array], lo, hi, n: int = 200, cmap: str = "viridis", title=None):
    """A heat map of exp(log_prob_fn), normalised to its maximum, on [lo, hi]."""
    return scalar_field(ax, log_prob_fn, lo, hi, n, cmap, title, transform=lambda v: np.exp(v - v.max()))


def contours(ax, log_prob_fn: Callable[[Array], Array], lo, hi, n: int = 200, color="tab:red", levels=6, title=None):
    """Contour lines of exp(log_prob_fn), at fractions of its maximum, over a heat map drawn before."""
    xx, yy, pts = grid(lo, hi, n)
    logp = np.asarray(jax.jit(jax.vmap(log_prob_fn))(pts)).reshape(n, n)
    ax.contour(xx, yy, np.exp(logp - logp.max()), levels=np.linspace(0.05, 0.95, levels), colors=color, linewidths=1)
    return _finish(ax, title)


def energy(ax, energy_fn: Callable[[Array], Array], lo, hi, n: int = 200, levels: int = 30, title=None):
    """Filled contours of the energy f (shifted to min 0, clipped at its 95th percentile)."""
    xx, yy, pts = grid(lo, hi, n)
    f = np.asarray(jax.jit(jax.vmap(energy_fn))(pts)).reshape(n, n)
    f = f - f.min()
    cs = ax.contourf(xx, yy, np.minimum(f, np.percentile(f, 95)), levels=levels, cmap="magma_r")
    plt.colorbar(cs, ax=ax, fraction=0.046)
    return _finish(ax, title)


def score_field(ax, score_fn: Callable[[Array], Array], lo, hi, n: int = 20, color="k", title=None, **kw):
    """Arrows of the score s(x) on an n x n grid, lengths compressed by |s|^{-1/2} for legibility."""
    xx, yy, pts = grid(lo, hi, n)
    s = np.asarray(jax.jit(jax.vmap(score_fn))(pts))
    norm = np.linalg.norm(s, axis=-1, keepdims=True)
    s = s / np.sqrt(np.maximum(norm, 1e-12))
    ax.quiver(xx, yy, s[:, 0].reshape(n, n), s[:, 1].reshape(n, n), color=color, **kw)
    return _finish(ax, title)


def samples(ax, xs, lo=None, hi=None, bins: int = 100, title=None):
    """A 2-D histogram of samples (n, 2)."""
    xs = np.asarray(xs)
    finite = np.all(np.isfinite(xs), axis=-1)
    rng = None if lo is None else [[lo[0], hi[0]], [lo[1], hi[1]]]
    ax.hist2d(xs[finite, 0], xs[finite, 1], bins=bins, range=rng, cmap="viridis")
    return _finish(ax, title)


def loss_curve(ax, history: Sequence[dict], key: str = "loss", label=None, title=None, logy=False):
    """`key` against `step` from `fit`'s history rows."""
    steps = [row["step"] for row in history]
    ax.plot(steps, [row[key] for row in history], label=label or key)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    return ax


def _finish(ax, title):
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def figure(n_panels: int = 1, size: float = 4.0):
    """A row of `n_panels` square axes."""
    fig, axes = plt.subplots(1, n_panels, figsize=(size * n_panels, size), squeeze=False)
    return fig, list(axes[0])


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
