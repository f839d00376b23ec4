"""Does implicit score matching overfit a finite data set, and do the curvature penalty and DSM cure it?

J_ISM(f) = E_p [1/2 |∇f(x)|² - Δf(x)] = J_ESM(f) - C, C a constant of the data law alone, so
on the SAME held-out points J_ISM ranks models as the Fisher divergence to p does (lower is
better) without knowing p's score. On a finite training set a flexible energy can make every
training digit the bottom of a sharp well: Δf -> +∞ at the points, the training J_ISM runs away
towards -∞, and the held-out J_ISM, measured where the wells are not, gets worse.

This script trains the same MLP energy f_θ (`nets.MLPEnergy`, softplus) on a few hundred 8x8
digits by
  ism              plain ISM, `objectives.ism_energy(f, xs)`;
  ism λ=...        Kingma & LeCun (2010)'s curvature penalty, `ism_energy(f, xs, hessian_penalty=λ)`:
                   + λ Σ_k (∂²f/∂x_k²)², the exact Hessian diagonal from the loss's own jet;
  ism cbp λ=...    the same penalty with THEIR approximate diagonal (curvature backpropagation,
                   Becker & LeCun 1988: second derivatives pushed back layer by layer dropping the
                   off-diagonal terms; `curvature_backprop`), the diagonal they could afford;
  dsm σ=...        denoising score matching of the energy, `objectives.dsm(score_of(f), ...)`: it
                   learns p_σ = p * N(0, σ² I), and is evaluated like the others at σ -> 0, i.e. by
                   the plain held-out J_ISM of its energy;
and evaluates, every steps / evaluations steps through `fit`'s callbacks, the plain J_ISM (no
penalty) of every energy on the training digits and on held-out digits.

Data: `n_train` training digits (class-balanced) of `jsm.data.digits()`'s training split, all of
its held-out split, each digit dequantised ONCE by Gaussian noise of std `dequantize` (pixel
units; the pixel levels are 1/16 apart), then standardised per pixel with the training mean and
std. Why Gaussian: some pixels of the raw digits never vary (the corners are always 0), and a
law with a bounded support and mass at its edges (uniform dequantisation) makes J_ISM unbounded
below even with infinite data; the law of x + N(0, τ² I) is smooth and positive everywhere, so
ISM is well posed and whatever runs away here is overfitting. The fixed draws make the data set
finite: the model sees the same n_train points at every epoch.

Sample quality: MALA (`jsm.samplers.mala` on log q = -f, step size tuned by dual averaging to
acceptance 0.574, then `chain_steps` steps) started from draws of the Gaussian fitted to the
training digits, the same draws for every model; DSM models' samples also get Tweedie's
denoising step x - σ² ∇f(x) (reported separately). In pixel units the samples are scored by
experiments/digits.py's functions (classifier confidence and class balance, MMD² with one bandwidth
for all to the held-out digits past the first n_chains, which are the held-out reference), and by
their memorisation ratio: the mean distance from a
sample to its nearest TRAINING digit over the same mean for held-out digits (1: as far from the
training set as fresh digits; << 1: copies of training digits; >> 1: off the data).
References: the full-covariance Gaussian fit (its J_ISM in closed form, its exact samples), the
held-out digits and the training digits themselves.

Curvature backpropagation against the exact diagonal: the relative error |D̃ - D| / |D| of the
approximate diagonal D̃ against `jsm.forward.hessian_diagonal_batch`'s D, and the penalties
Σ_k D_k², Σ_k D̃_k² (means over the points), on the training and on the held-out digits, for every
trained energy and at initialisation; both methods' times on this machine. A model trained with
the penalty on D̃ can grow the curvature D̃ does not see: compare its two penalties at the
training points.

    python experiments/ism_overfitting.py --workdir runs/ism_overfitting           # ~6-7 min on 2 busy CPU cores
    python experiments/ism_overfitting.py --quick --workdir /tmp/ism_overfitting   # the smoke test (~40 s)

`--quick` replaces every size still at its default by `QUICK`'s. A run in an existing workdir
resumes each method's `fit` from its checkpoints (one subfolder per method).

results.json: "methods" (names, in order); "table" (one row per method: objective, lam, sigma,
final_held_out_j_ism, best_held_out_j_ism, best_step, final_train_j_ism, final_training_loss (the
method's own objective, mean over the last log_every steps), training_seconds, non_finite_at_step,
and the sample scores: mmd2_to_held_out, confidence, class_balance, inception_score,
nearest_train_ratio, nonfinite_samples, acceptance, step_size, nonfinite_chains, and for DSM the same scores of the
denoised samples under "denoised"); "curves" (per method: rows step, train_j_ism, held_out_j_ism,
step 0 the shared initialisation); "losses" (per method: rows step, loss); "references"
(Gaussian fit, held-out digits, training digits: their J_ISM where defined and sample scores);
"curvature_backprop" ("models": per method and "initialisation", for "train" and "held_out":
relative_error, mean_sum_sq_exact, mean_sum_sq_approximate; exact_ms, approximate_ms, speedup);
"data"; "wall_s". Figures: figures/curves.png (training objective, training J_ISM and held-out
J_ISM against steps), figures/samples.png.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jsm
from jsm import data, nets, objectives, plot, runs, samplers

import common
import digits
from bench.timing import interleaved  # experiments/bench/: the benchmarks' timing helpers

D = 64  # 8 x 8 pixels
EVAL = "eval"  # the callback's name


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/ism_overfitting"
    seed: int = 0
    quick: bool = dataclasses.field(default=False, metadata={"help": "the smoke test's sizes (QUICK) for every "
                                                                     "size left at its default"})
    n_train: int = 250  # training digits, class-balanced, from data.digits()'s training split
    dequantize: float = 0.05  # τ: std (pixel units) of the Gaussian noise added once to every digit
    hidden: tuple[int, ...] = (128, 128)
    steps: int = 2000
    batch_size: int = 125
    learning_rate: float = 1e-3
    penalties: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  # λ of the exact curvature penalty
    approximate_penalties: tuple[float, ...] = (0.1, 1.0)  # λ of the penalty on the curvature-backprop diagonal
    dsm_sigmas: tuple[float, ...] = (0.1, 0.3, 1.0)  # σ of DSM, in standardised units (per-pixel std 1)
    evaluations: int = 20  # held-out and training J_ISM this many times per run (and at step 0)
    gaussian_ridge: float = 1e-2  # added to the training covariance (standardised units) of the Gaussian fit
    n_chains: int = 200
    tune_steps: int = 300
    chain_steps: int = 1000
    timing_reps: int = 5  # of the exact and approximate diagonals
    checkpoint_every: int = 1000
    log_every: int = 50
    progress: bool = True


QUICK = dict(n_train=60, hidden=(32, 32), steps=40, batch_size=30, penalties=(0.1,), approximate_penalties=(0.1,),
             dsm_sigmas=(0.3,), evaluations=2, n_chains=32, tune_steps=10, chain_steps=20, timing_reps=1,
             checkpoint_every=20, log_every=10)


def resolve(config: Config) -> Config:
    """With `quick`, QUICK's value for every field still at its full default."""
    return common.with_quick_sizes(config, QUICK)


# --- the methods ------------------------------------------------------------------------


class Method(NamedTuple):
    objective: str  # "ism", "ism_penalty", "ism_cbp" or "dsm"
    value: float = 0.0  # λ of a penalty, σ of DSM

    @property
    def name(self) -> str:
        return {"ism": "ism", "ism_penalty": f"ism λ={self.value:g}", "ism_cbp": f"ism cbp λ={self.value:g}",
                "dsm": f"dsm σ={self.value:g}"}[self.objective]

    @property
    def folder(self) -> str:
        return self.objective if self.objective == "ism" else f"{self.objective}_{self.value:g}"


def methods(config: Config) -> list[Method]:
    return ([Method("ism")] + [Method("ism_penalty", lam) for lam in config.penalties]
            + [Method("ism_cbp", lam) for lam in config.approximate_penalties]
            + [Method("dsm", sigma) for sigma in config.dsm_sigmas])


# --- data -------------------------------------------------------------------------------


class Digits(NamedTuple):
    x_train: jax.Array  # (n_train, 64) standardised
    x_test: jax.Array  # (n_test, 64) standardised
    mean: np.ndarray  # (64,) pixel units
    scale: np.ndarray  # (64,)
    pixels_train: np.ndarray  # (n_train, 64) dequantised, pixel units
    pixels_test: np.ndarray
    split: data.Split  # the raw digits (the classifier's training set)

    def to_pixels(self, xs) -> np.ndarray:
        return np.asarray(xs, np.float64) * self.scale + self.mean


def load(config: Config) -> Digits:
    """n_train class-balanced training digits and every held-out digit, dequantised once, standardised."""
    split = data.digits(config.seed)
    most = 10 * min(np.bincount(split.y_train))
    if not 2 <= config.n_train <= most:
        raise ValueError(f"config.n_train must be in [2, {most}] (class-balanced), got {config.n_train}")
    if not 2 <= config.n_chains <= split.x_test.shape[0] - 2:
        raise ValueError(f"config.n_chains must be in [2, {split.x_test.shape[0] - 2}] (the held-out digits are split "
                         f"between the reference and the MMD's target), got {config.n_chains}")
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(split.x_train.shape[0])
    per_class = -(-config.n_train // 10)
    chosen = np.concatenate([order[split.y_train[order] == c][:per_class] for c in range(10)])
    chosen = np.sort(rng.permutation(chosen)[:config.n_train])
    noisy = lambda x: (x + config.dequantize * rng.standard_normal(x.shape)).astype(np.float32)
    train, test = noisy(split.x_train[chosen]), noisy(split.x_test)
    mean, scale = train.mean(0), train.std(0)
    standard = lambda x: jnp.asarray((x - mean) / scale, jnp.float32)
    return Digits(standard(train), standard(test), mean, scale, train, test, split)


# --- Kingma & LeCun's diagonal: curvature backpropagation -------------------------------


def layers_of(params) -> list[tuple[jax.Array, jax.Array]]:
    """[(W, b), ...] of a `nets.MLPEnergy`'s layers, z = a W + b."""
    layers = params["mlp"]["layers"]
    return [(layers[i]["kernel"][...], layers[i]["bias"][...]) for i in range(len(layers))]


def curvature_backprop(params, x: jax.Array, activation=jax.nn.softplus) -> jax.Array:
    """Becker & LeCun (1988)'s approximate ∂²f/∂x_k², (d,), for an MLP energy f = w·a_L + c.

    Back from the output, with a_l = φ(z_l), z_l = a_{l-1} W_l + b_l, the gradient g and the
    diagonal h of the Hessian in each layer's units, off-diagonal terms dropped:

        g_z = φ'(z) g_a,   h_z = φ'(z)² h_a + φ''(z) g_a,   g_a' = W g_z,   h_a' = (W ∘ W) h_z,

    from g = w, h = 0 at the last hidden layer; h at x is the estimate. Exact with one hidden
    layer (the Hessian in z is diagonal there); with more, the last rule drops
    Σ_{i≠j} W_ki W_kj ∂²f/∂z_i∂z_j. One backward pass: O(width²) per example, not O(d width²).
    """
    weights = layers_of(params)
    zs, a = [], x
    for w, b in weights[:-1]:
        zs.append(a @ w + b)
        a = activation(zs[-1])
    g = weights[-1][0][:, 0]
    h = jnp.zeros_like(g)
    d1 = jax.grad(activation)
    d2 = jax.grad(d1)
    for (w, _), z in zip(reversed(weights[:-1]), reversed(zs)):
        phi1, phi2 = jax.vmap(d1)(z), jax.vmap(d2)(z)
        g, h = w @ (phi1 * g), (w * w) @ (phi1**2 * h + phi2 * g)
    return h


# --- training ---------------------------------------------------------------------------


def loss_for(method: Method, apply):
    """loss(params, key, xs) of a method, for `jsm.fit`."""
    energy = lambda p: (lambda x: apply(p, x))
    if method.objective == "ism":
        return lambda p, k, xs: objectives.ism_energy(energy(p), xs)
    if method.objective == "ism_penalty":
        return lambda p, k, xs: objectives.ism_energy(energy(p), xs, hessian_penalty=method.value)
    if method.objective == "ism_cbp":
        def loss(p, k, xs):
            approx = jax.vmap(lambda x: curvature_backprop(p, x))(xs)
            return objectives.ism_energy(energy(p), xs) + method.value * jnp.mean(jnp.sum(approx**2, -1))
        return loss
    return lambda p, k, xs: objectives.dsm(jsm.score_of(energy(p)), k, xs, method.value)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def evaluator(apply, sets: Digits):
    """params -> {"train_j_ism", "held_out_j_ism"}: the plain J_ISM (no penalty, no noise) of f_params on the
    training and on the held-out digits, one compiled function for every method."""
    both = jax.jit(lambda p: [objectives.ism_energy(lambda x: apply(p, x), xs) for xs in (sets.x_train, sets.x_test)])

    def evaluate(params) -> dict:
        train, held = both(params)
        return {"train_j_ism": float(train), "held_out_j_ism": float(held)}

    return evaluate


def train(config: Config, method: Method, apply, params, sets: Digits, evaluate) -> dict:
    """One method's run: its final params, evaluation rows, loss rows, seconds and the step (if any) it blew up at."""
    workdir = Path(config.workdir) / method.folder
    callback = common.evaluations(EVAL, config.steps, config.evaluations, lambda state: evaluate(state.params))
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    try:
        result = jsm.fit(loss_for(method, apply), params, sets.x_train,
                         optimizer=optax.adam(config.learning_rate), key=key, callbacks=[callback],
                         **runs.fit_options(config, workdir=workdir))
        final, rows, history, blew_up = result.params, result.callbacks[EVAL], result.history, None
    except jsm.train.NonFiniteError as e:  # ISM run away to inf: keep what it had, say where it stopped
        final, blew_up = e.state.params, e.step
        rows, history = read_rows(workdir / "callbacks" / f"{EVAL}.json"), read_rows(workdir / "metrics.jsonl")
    return {"params": final, "curve": rows, "losses": [{"step": r["step"], "loss": r["loss"]} for r in history],
            "training_seconds": digits.training_seconds(workdir), "non_finite_at_step": blew_up}


# --- samples ----------------------------------------------------------------------------


def memorisation(xs: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Mean distance to the nearest training digit of xs over that of the held-out digits (pixel units)."""
    nearest = lambda a: np.sqrt(np.min(np.sum((a[:, None] - train[None]) ** 2, -1), 1)).mean()
    return float(nearest(np.asarray(xs, np.float64)) / nearest(test))


def fit_classifier(split: data.Split):
    """digits.py's classifier: logistic regression on the raw training digits (all of the training split)."""
    from sklearn.linear_model import LogisticRegression

    with one_blas_thread():
        return LogisticRegression(max_iter=5000).fit(split.x_train, split.y_train)


def one_blas_thread():
    """NumPy/scikit-learn's BLAS on one thread: on a busy 2-core machine OpenBLAS's spinning threads make the
    classifier's fit 100-300x slower (14 s against 0.04 s measured while JAX and other jobs shared the cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def sample_scores(xs_pixels, sets: Digits, target: np.ndarray, classifier, bandwidth: float) -> dict:
    """digits.py's scores (MMD² to `target`) and the memorisation ratio of samples in pixel units; non-finite
    samples are counted and left out."""
    xs = np.asarray(xs_pixels, np.float64)
    finite = np.all(np.isfinite(xs), -1)
    out = {"nonfinite_samples": int(np.sum(~finite))}
    xs = xs[finite]
    if xs.shape[0] < 2:
        return out | {k: float("nan") for k in ("confidence", "class_balance", "inception_score", "mmd2_to_held_out",
                                                 "nearest_train_ratio")}
    with one_blas_thread():
        return out | digits.scores(np.float32(xs), classifier, target, bandwidth) | {
            "nearest_train_ratio": memorisation(xs, sets.pixels_train, sets.pixels_test)}


def mala_samples(config: Config, kernel: samplers.Kernel, params, x0: jax.Array) -> tuple[jax.Array, dict]:
    """`kernel` (MALA on log q(x, params) = -f_params(x)) from x0: the step size tuned by dual averaging, then
    `chain_steps` steps. The parameters are the chains' args: one compilation serves every model."""
    key = jax.random.fold_in(jax.random.key(config.seed), 2)
    k_tune, k_run = jax.random.split(key)
    step, state = samplers.tune_step_size(kernel, k_tune, x0, config.tune_steps, args=(params,))
    final, _, info = samplers.run_chains(kernel.replace(step_size=step), k_run, state.position, config.chain_steps,
                                         args=(params,))
    return final.position, {"step_size": float(step), "acceptance": float(jnp.mean(info.acceptance_rate)),
                            "nonfinite_chains": int(jnp.sum(info.n_nonfinite > 0))}


# --- the Gaussian reference -------------------------------------------------------------


def gaussian_fit(config: Config, x_train: jax.Array):
    """The full-covariance Gaussian of the training digits (standardised), its energy and exact sampler."""
    mu = x_train.mean(0)
    cov = jnp.cov(x_train.T) + config.gaussian_ridge * jnp.eye(D)
    precision = jnp.linalg.inv(cov)
    energy = lambda x: 0.5 * (x - mu) @ precision @ (x - mu)
    return energy, jsm.targets.Gaussian(mu, cov)


# --- curvature backprop against the exact diagonal --------------------------------------


def curvature_backprop_check(config: Config, apply, trained: dict, init_params, sets: Digits) -> dict:
    """D̃ (`curvature_backprop`) against the exact D (`jsm.forward.hessian_diagonal_batch`) for every model:
    |D̃ - D| / |D| over all points and pixels, and the mean penalties Σ_k D_k², Σ_k D̃_k², on the training and
    on the held-out digits; and both methods' times on all of them together (one compiled shape)."""
    exact = jax.jit(lambda p, xs: jsm.forward.hessian_diagonal_batch(lambda x: apply(p, x))(xs).diagonal)
    approx = jax.jit(lambda p, xs: jax.vmap(lambda x: curvature_backprop(p, x))(xs))
    xs = jnp.concatenate([sets.x_train, sets.x_test])
    parts = {"train": slice(0, sets.x_train.shape[0]), "held_out": slice(sets.x_train.shape[0], None)}

    def compare(p) -> dict:
        e, a = exact(p, xs), approx(p, xs)
        return {part: {"relative_error": float(jnp.linalg.norm(a[i] - e[i]) / jnp.linalg.norm(e[i])),
                       "mean_sum_sq_exact": float(jnp.mean(jnp.sum(e[i] ** 2, -1))),
                       "mean_sum_sq_approximate": float(jnp.mean(jnp.sum(a[i] ** 2, -1)))}
                for part, i in parts.items()}

    ms = {name: 1e3 * median for name, (median, _) in
          interleaved({"exact": exact, "approximate": approx}, init_params, xs, reps=config.timing_reps).items()}
    return {"models": {k: compare(p) for k, p in {"initialisation": init_params, **trained}.items()},
            "exact_ms": ms["exact"], "approximate_ms": ms["approximate"], "speedup": ms["exact"] / ms["approximate"],
            "n_timed_points": int(xs.shape[0])}


# --- figures ----------------------------------------------------------------------------


def curves_figure(path: Path, results: dict, reference: dict) -> None:
    """Three panels against steps: each method's own objective, J_ISM on the training digits, held-out J_ISM;
    `reference` (the Gaussian fit's train_j_ism and held_out_j_ism) drawn as dotted lines."""
    fig, axes = plot.figure(3, size=5)
    panels = (("losses", "loss", "the method's own training objective"),
              ("curves", "train_j_ism", "J_ISM on the training digits"),
              ("curves", "held_out_j_ism", "held-out J_ISM (lower is better)"))
    for ax, (group, field, title) in zip(axes, panels):
        for name, rows in results[group].items():
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r[field] for r in rows], "-" if name.startswith("ism") else "--", label=name)
        if field != "loss":
            ax.axhline(reference[field], color="k", lw=0.8, ls=":", label="Gaussian fit")
        ax.set_yscale("symlog", linthresh=10.0)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.set_aspect("auto")
    axes[0].legend(fontsize=7)
    axes[2].legend(handles=axes[2].get_lines()[-1:], fontsize=7)
    plot.save(fig, path)


def samples_figure(path: Path, rows: dict[str, np.ndarray]) -> None:
    n = 10
    fig, (ax,) = plot.figure(1, size=8)
    strips = [np.pad(np.clip(xs[:n], 0, 1).reshape(-1, 8, 8), ((0, n - min(n, len(xs))), (0, 1), (0, 1)))
              for xs in rows.values()]
    image = np.concatenate([s.transpose(1, 0, 2).reshape(9, 9 * n) for s in strips])
    ax.imshow(image, cmap="gray_r", vmin=0, vmax=1)
    ax.set_yticks([9 * i + 4 for i in range(len(rows))], list(rows))
    ax.set_xticks([])
    ax.set_title("first 10 of each set: digits, Gaussian draws (the chains' start), MALA samples;\n"
                 "pixels clipped to [0, 1]", fontsize=9)
    plot.save(fig, path)


# --- main -------------------------------------------------------------------------------


def main(config: Config) -> dict:
    t_start = time.perf_counter()
    config = resolve(config)
    workdir = runs.prepare_workdir(config)
    sets = load(config)
    apply, init_params = nets.pure(nets.MLPEnergy(D, config.hidden, rngs=nnx.Rngs(config.seed)))
    evaluate = evaluator(apply, sets)
    start = {"step": 0, **evaluate(init_params)}

    runs_ = {}
    for method in methods(config):
        runs_[method.name] = train(config, method, apply, init_params, sets, evaluate)

    # References and the samplers' common start: the Gaussian fitted to the training digits.
    energy_g, gaussian = gaussian_fit(config, sets.x_train)
    key = jax.random.fold_in(jax.random.key(config.seed), 3)
    x0 = gaussian.sample(key, config.n_chains)
    classifier = fit_classifier(sets.split)
    # The MMD's held-out digits are not the held-out reference's: the first n_chains held-out digits are
    # that reference, the rest the target every sample set is compared with.
    n = config.n_chains
    target = sets.pixels_test[n:]
    pooled = np.concatenate([sets.pixels_train[:n], target[:n]])
    bandwidth = float(np.median(np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)))
    score = lambda xs: sample_scores(xs, sets, target, classifier, bandwidth)
    references = {
        "Gaussian fit": {"train_j_ism": float(objectives.ism_energy(energy_g, sets.x_train)),
                         "held_out_j_ism": float(objectives.ism_energy(energy_g, sets.x_test)),
                         **score(sets.to_pixels(x0))},
        "held-out digits": score(sets.pixels_test[:n]),
        "training digits": score(sets.pixels_train[:n]),
    }
    shown = {"held-out digits": sets.pixels_test, "Gaussian fit": sets.to_pixels(x0)}

    kernel = samplers.mala(lambda x, p: -apply(p, x), 0.01)
    table = []
    for method in methods(config):
        r = runs_[method.name]
        curve = [start] + [{"step": row["step"], "train_j_ism": row["train_j_ism"],
                            "held_out_j_ism": row["held_out_j_ism"]} for row in r["curve"]]
        r["curve"] = curve
        held = [row["held_out_j_ism"] for row in curve]
        best = int(np.nanargmin(held)) if np.any(np.isfinite(held)) else 0
        xs, chain_info = mala_samples(config, kernel, r["params"], x0)
        row = {"method": method.name, "objective": method.objective,
               "lam": method.value if method.objective.startswith("ism_") else None,
               "sigma": method.value if method.objective == "dsm" else None,
               "final_held_out_j_ism": held[-1], "best_held_out_j_ism": held[best], "best_step": curve[best]["step"],
               "final_train_j_ism": curve[-1]["train_j_ism"],
               "final_training_loss": r["losses"][-1]["loss"] if r["losses"] else float("nan"),
               "training_seconds": r["training_seconds"], "non_finite_at_step": r["non_finite_at_step"],
               **chain_info, **score(sets.to_pixels(xs))}
        shown[method.name] = sets.to_pixels(xs)
        if method.objective == "dsm":  # Tweedie: E[x | x̃] = x̃ + σ² ∇log p_σ(x̃), with -∇f for the score
            grad = jax.vmap(jax.grad(lambda x: apply(r["params"], x)))(xs)
            denoised = sets.to_pixels(xs - method.value**2 * grad)
            row["denoised"] = score(denoised)
            shown[f"{method.name} denoised"] = denoised
        table.append(row)

    check = curvature_backprop_check(config, apply, {m.name: runs_[m.name]["params"] for m in methods(config)},
                                     init_params, sets)
    out = {
        "methods": [m.name for m in methods(config)],
        "table": table,
        "curves": {k: r["curve"] for k, r in runs_.items()},
        "losses": {k: r["losses"] for k, r in runs_.items()},
        "references": references,
        "curvature_backprop": check,
        "data": {"n_train": int(sets.x_train.shape[0]), "n_held_out": int(sets.x_test.shape[0]), "d": D,
                 "dequantize": config.dequantize, "bandwidth": bandwidth,
                 "classifier_test_accuracy": float(classifier.score(sets.split.x_test, sets.split.y_test))},
    }
    curves_figure(workdir / "figures" / "curves.png", out, references["Gaussian fit"])
    samples_figure(workdir / "figures" / "samples.png", shown)
    out["wall_s"] = time.perf_counter() - t_start
    runs.save_json(workdir / "results.json", out)

    print(f"{'method':16s} {'held-out J_ISM':>15s} {'best (step)':>17s} {'train J_ISM':>12s} {'train loss':>11s} "
          f"{'MMD²':>7s} {'nearest':>7s} {'conf':>5s} {'accept':>6s} {'train s':>7s}")
    fmt = lambda v: f"{v:15.4g}" if v is not None and math.isfinite(v) else f"{'nan':>15s}"
    for row in table:
        print(f"{row['method']:16s} {fmt(row['final_held_out_j_ism'])} {row['best_held_out_j_ism']:10.4g} "
              f"({row['best_step']:5d}) {row['final_train_j_ism']:12.4g} {row['final_training_loss']:11.4g} "
              f"{row['mmd2_to_held_out']:7.4f} {row['nearest_train_ratio']:7.3f} {row['confidence']:5.2f} "
              f"{row['acceptance']:6.2f} {row['training_seconds']:7.1f}")
    g = references["Gaussian fit"]
    print(f"{'Gaussian fit':16s} {g['held_out_j_ism']:15.4g} {'':17s} {g['train_j_ism']:12.4g} {'':11s} "
          f"{g['mmd2_to_held_out']:7.4f} {g['nearest_train_ratio']:7.3f} {g['confidence']:5.2f}")
    for name in ("held-out digits", "training digits"):
        r = references[name]
        print(f"{name:16s} {'':15s} {'':17s} {'':12s} {'':11s} {r['mmd2_to_held_out']:7.4f} "
              f"{r['nearest_train_ratio']:7.3f} {r['confidence']:5.2f}")
    for row in table:
        if "denoised" in row:
            print(f"{row['method']} denoised (Tweedie): MMD² {row['denoised']['mmd2_to_held_out']:.4f}, "
                  f"nearest {row['denoised']['nearest_train_ratio']:.3f}")
    print(f"curvature backprop: {check['approximate_ms']:.2f} ms against the exact diagonal's "
          f"{check['exact_ms']:.2f} ms ({check['speedup']:.1f}x faster) on {check['n_timed_points']} points; "
          "|D̃ - D| / |D| (mean Σ D², mean Σ D̃²):")
    for name, c in check["models"].items():
        print(f"  {name:16s} " + "   ".join(
            f"{part} {c[part]['relative_error']:.3f} ({c[part]['mean_sum_sq_exact']:.3g}, "
            f"{c[part]['mean_sum_sq_approximate']:.3g})" for part in ("train", "held_out")))
    print(f"wall {out['wall_s']:.0f} s")
    return out


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
