"""A diffusion model on real 8x8 digits: exact bits/dim, samples, and classifier-free guidance.

A VP-SDE score model s_θ(z, t) is trained by `dsm_sde` on scikit-learn's digits and evaluated three ways.

Bits/dim of the held-out digits by the probability-flow ODE, with the EXACT divergence (one
forward jet of the 64 x 64 Jacobian: deterministic) and with Hutchinson's estimator (one
Rademacher probe per path, as in score_sde), repeated over `hutchinson_keys` keys: its mean ± std
over keys, and the time per example of both; next to the closed-form bits/dim of a Gaussian
with full covariance fitted to the same dequantised training digits.

The data are discrete: pixel k/16, k in 0..16 (17 values). The model's density is continuous,
so it is trained and evaluated on uniformly dequantised pixels x = k/16 + Δ (u - 1/2),
u ~ U(0, 1), Δ = 1/16 (each value's bin of width Δ centred on it; fresh u at every training
step, one fixed draw for the test digits, shared by every model). Then -log2 P(k) <=
-E_u log2 (p(x) Δ^d) (Jensen), so bits/dim = -(log p_x(x) + d log Δ) / (d log 2) bounds the
discrete model's code length from above. The network sees standardised data z = (x - μ) / s
(μ the training digits' per-pixel mean, s one scalar: the std of x - μ over all pixels), so
that the VP SDE's prior N(0, I) fits; its density is p_z, and

    log p_x(x) = log p_z(z) - d log s,    i.e.  bits/dim = -(log p_z(z) + d log(Δ / s)) / (d log 2):

the bin width in z's units is Δ / s, and the rescaling's log-determinant -d log s is what makes the
number comparable with a model of x (both forms are computed and must agree).

Samples (unconditional model, EMA parameters) by predictor-corrector and by the ODE, scored
with experiments/digits.py's classifier and functions (confidence, class balance, Inception-Score
analogue, MMD² to held-out digits), against digits.py's NCSN + annealed Langevin, which is
run at its defaults (`ncsn_steps`) inside this run.

Classifier-free guidance: a second network s_θ(z, t, y) trained with each label replaced by the
null label with probability `label_dropout`, sampled by PC with s_w = (1 + w) s(z, t, y) - w s(z, t, ∅)
for each w in `guidance_weights`; the classifier's accuracy on the requested class.

    python experiments/diffusion_digits.py --workdir runs/diffusion_digits

Writes results.json and figures/diffusion_digits.png under --workdir; the runs (checkpoints,
metrics.jsonl, bits/dim evaluated during training) in unconditional/, conditional/ and ncsn/.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jsm
from jsm import data, diffusion, likelihood, nets, objectives, plot, runs, sde as sde_lib, targets

import common
import digits

D = 64  # 8 x 8 pixels
BIN_WIDTH = 1.0 / 16.0  # Δ: the pixels take the values k/16, k = 0..16
N_CLASSES = 10
RUNS = ("unconditional", "conditional")  # the two score models' subfolders (and their keys)


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/diffusion_digits"
    steps: int = 8000  # training steps of each score model (unconditional, conditional)
    seed: int = 0
    net: str = dataclasses.field(default="mlp", metadata={"choices": ("mlp",), "help": "the score network"})
    hidden: tuple[int, ...] = (256, 256)
    activation: str = dataclasses.field(default="silu", metadata={"choices": ("silu", "softplus")})
    beta_min: float = 0.1
    beta_max: float = 20.0
    learning_rate: float = 1e-3  # cosine-decayed to 5% over the run
    batch_size: int = 128
    ema_decay: float = 0.999  # every evaluation and every sample uses the moving average
    evaluations: int = 2  # times the exact test bits/dim is computed during training
    n_test: int = 0  # held-out digits for bits/dim; 0: all 450
    hutchinson_keys: int = 8
    pc_steps: int = 500
    corrector_steps: int = 1
    snr: float = 0.16
    label_dropout: float = 0.1  # P(y -> null label) in the conditional model's training
    guidance_weights: tuple[float, ...] = (0.0, 1.0, 3.0)
    n_per_class: int = 50  # guided samples per class and w
    ncsn_steps: int = 10_000  # digits.py's default: its README numbers
    checkpoint_every: int = 1000
    log_every: int = 100
    progress: bool = True


# --- data -------------------------------------------------------------------------------


class Standardised:
    """z = (x - μ) / s, per-pixel μ and one scalar s, and back; log p_x(x) = log p_z(z) - d log s."""

    def __init__(self, x_train: np.ndarray):
        self.mean = jnp.asarray(x_train.mean(0))
        self.scale = float((x_train - x_train.mean(0)).std())

    def forward(self, x):
        return (jnp.asarray(x) - self.mean) / self.scale

    def inverse(self, z):
        return self.mean + self.scale * z

    def log_det(self) -> float:
        """log |det ∂z/∂x| = -d log s."""
        return -D * math.log(self.scale)


def dequantise(key, x):
    """x + Δ (u - 1/2), u ~ U(0, 1): uniform within each value's bin (in the units of x)."""
    return x + BIN_WIDTH * (jax.random.uniform(key, x.shape, x.dtype) - 0.5)


# --- the networks -------------------------------------------------------------------------


def score_network(config: Config, sde, num_classes: int | None = None):
    """(apply, params) with apply(params, z, t[, y]) -> (64,) for ONE flat example z (64,).

    The place for other architectures (`--net`): anything that maps a flat z to a flat score.
    The MLP is preconditioned for unit-scale data (σ_d = 1 after standardising).
    """
    if config.net == "mlp":
        net = nets.NoiseConditionalScore(D, config.hidden, rngs=nnx.Rngs(config.seed), noise="t",
                                         marginal=sde.marginal, data_scale=1.0, num_classes=num_classes,
                                         activation={"silu": jax.nn.silu, "softplus": jax.nn.softplus}[config.activation])
        return nets.pure(net)
    raise ValueError(f"unknown net {config.net!r}")


def dequantised_dsm(apply, sde, params, key, zs, dz: float):
    """`dsm_sde` on standardised digits zs (n, 64), dequantised afresh: z + dz (u - 1/2), dz = Δ / s
    (the bin width in z's units)."""
    k_deq, k_dsm = jax.random.split(key)
    zs = zs + dz * (jax.random.uniform(k_deq, zs.shape, zs.dtype) - 0.5)
    return objectives.dsm_sde(lambda z, t: apply(params, z, t), sde, k_dsm, zs)


def conditional_dsm(apply, sde, params, key, batch, dz: float, label_dropout: float):
    """`dsm_sde` for s_θ(z, t, y) on a batch (n, 64 + 1) of [z, y] (fit's data is one array), z
    dequantised as in `dequantised_dsm`, y replaced by the null label with probability
    `label_dropout` (Ho & Salimans 2022), so that s_θ(z, t, ∅) learns the unconditional score."""
    k_deq, k_drop, k_t, k_z = jax.random.split(key, 4)
    zs, ys = batch[:, :D], batch[:, D].astype(jnp.int32)
    zs = zs + dz * (jax.random.uniform(k_deq, zs.shape, zs.dtype) - 0.5)
    ys = jnp.where(jax.random.uniform(k_drop, ys.shape) < label_dropout, diffusion.NULL_LABEL, ys)
    t, w = objectives.training_times(sde, k_t, zs.shape[0])  # as in dsm_sde: one t and one z per example
    noise = jax.random.normal(k_z, zs.shape, zs.dtype)
    term = lambda z, y, ti, e, wi: objectives.dsm_sde_per_example(lambda x, s: apply(params, x, s, y), sde, z, ti, e, wi)
    return jnp.mean(jax.vmap(term)(zs, ys, t.astype(zs.dtype), noise, w.astype(zs.dtype)))


def log_prob_fn(apply, sde, trace: str):
    """(params, zs, key) -> log p_z(zs) (n,) by the ODE; one compilation for every params value (they
    travel as `args`), shared by the evaluations during training and the timed runs."""
    score_fn = lambda z, t, params: apply(params, z, t)  # one function object: one compilation
    return lambda p, zs, key: likelihood.log_prob(score_fn, sde, zs, trace=trace,
                                                  key=None if trace == "exact" else key, args=(p,))


def timed(fn, *args):
    """(fn(*args), seconds), waiting for the result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def bits_per_dim(log_p_z, std: Standardised):
    """Test bits/dim of x from log p_z: -(log p_z(z) - d log s + d log Δ) / (d log 2)."""
    return likelihood.bits_per_dim(log_p_z + std.log_det(), D, bin_width=BIN_WIDTH)


def train(config: Config, name: str, batch_data, loss, apply, params, callbacks=()):
    """fit with the EMA, a cosine-decayed Adam, and the run in <workdir>/<name>."""
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps, 0.05))
    return jsm.fit(loss, params, batch_data, optimizer=optimizer,
                   key=jax.random.fold_in(jax.random.key(config.seed), RUNS.index(name)),
                   ema_decay=config.ema_decay, callbacks=list(callbacks),
                   **runs.fit_options(config, workdir=f"{config.workdir}/{name}"))


def gaussian_baseline_bpd(x_train: np.ndarray, x_test_deq) -> jax.Array:
    """Per-example bits/dim of N(μ, Σ) fitted to the dequantised training digits, in closed form:
    μ = mean of x, Σ = Cov(x) + Δ²/12 I (the uniform dequantisation noise's covariance, added exactly)."""
    mean = x_train.mean(0)
    cov = np.cov(x_train.T.astype(np.float64)) + BIN_WIDTH**2 / 12 * np.eye(D)
    gauss = targets.Gaussian(jnp.asarray(mean), jnp.asarray(cov, jnp.float32))
    return likelihood.bits_per_dim(jax.vmap(gauss.log_prob)(x_test_deq), D, bin_width=BIN_WIDTH)


def tile_grid(xs, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """rows x cols digits (rows * cols, 64) as one image."""
    imgs = np.pad(np.asarray(xs)[: rows * cols].reshape(rows, cols, 8, 8), ((0, 0), (0, 0), (0, pad), (0, pad)))
    return imgs.transpose(0, 2, 1, 3).reshape(rows * (8 + pad), cols * (8 + pad))


# --- the run --------------------------------------------------------------------------------


def main(config: Config) -> dict:
    from sklearn.linear_model import LogisticRegression

    workdir = runs.prepare_workdir(config)
    split = data.digits(config.seed)
    sde = sde_lib.VPSDE(beta_min=config.beta_min, beta_max=config.beta_max)
    std = Standardised(split.x_train)
    key = jax.random.fold_in(jax.random.key(config.seed), 7)
    k_test, k_hutch, k_samples, k_guided = jax.random.split(key, 4)

    # the held-out digits, dequantised ONCE: every model is scored on the same points
    n_test = config.n_test or split.x_test.shape[0]
    x_test_deq = dequantise(k_test, jnp.asarray(split.x_test[:n_test]))
    z_test = std.forward(x_test_deq)

    # the unconditional model, on z; a bin of width Δ in x has width Δ / s in z
    z_train = std.forward(split.x_train)
    dz = BIN_WIDTH / std.scale
    apply, params = score_network(config, sde)
    loss = lambda p, k, zs: dequantised_dsm(apply, sde, p, k, zs, dz)
    exact = log_prob_fn(apply, sde, "exact")
    evaluate = common.evaluations("bits_per_dim", config.steps, config.evaluations, lambda state: {
        "exact": float(jnp.mean(bits_per_dim(exact(state.ema_params, z_test, k_hutch), std)))})
    result = train(config, "unconditional", z_train, loss, apply, params, [evaluate])
    ema = result.ema_params
    score = lambda z, t: apply(ema, z, t)

    # bits/dim: exact (the last evaluation in the run) and its timing; Hutchinson over keys. The first
    # call of each compiles, unless the run's evaluations already did (a resumed run may not have).
    (lp_exact, exact_first), (_, exact_s) = timed(exact, ema, z_test, k_hutch), timed(exact, ema, z_test, k_hutch)
    bpd_exact = bits_per_dim(lp_exact, std)
    # the same number with the bin width in z's units and no log-det: the two accountings agree
    bpd_z_units = likelihood.bits_per_dim(lp_exact, D, bin_width=dz)
    np.testing.assert_allclose(np.asarray(bpd_exact), np.asarray(bpd_z_units), atol=1e-3)
    hutchinson = log_prob_fn(apply, sde, "hutchinson")
    hutch_first = timed(hutchinson, ema, z_test, k_hutch)[1]
    hutch_runs, hutch_s = [], []
    for i in range(config.hutchinson_keys):
        lp, seconds = timed(hutchinson, ema, z_test, jax.random.fold_in(k_hutch, i))
        hutch_runs.append(bits_per_dim(lp, std))
        hutch_s.append(seconds)
    hutch_runs = jnp.stack(hutch_runs)  # (keys, n)
    bpd_gauss = gaussian_baseline_bpd(split.x_train, x_test_deq)
    means = np.asarray(hutch_runs.mean(1))
    out = {
        "bits_per_dim": {
            "score_model_exact": float(bpd_exact.mean()),
            "score_model_hutchinson": {"mean": float(means.mean()), "std": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
                                       "per_key": means.tolist(),
                                       "per_example_std_over_keys": float(jnp.mean(jnp.std(hutch_runs, axis=0, ddof=1)))
                                       if len(means) > 1 else 0.0},
            "gaussian_baseline": float(bpd_gauss.mean()),
        },
        "bits_per_dim_standard_error_over_test_digits": float(jnp.std(bpd_exact) / math.sqrt(n_test)),
        "seconds_per_example": {"exact": exact_s / n_test, "hutchinson": float(np.median(hutch_s)) / n_test,
                                "exact_first_call_s": exact_first, "hutchinson_first_call_s": hutch_first},
        "n_test": n_test,
        "bits_per_dim_over_training": result.callbacks["bits_per_dim"],
        "standardisation_scale": std.scale,
        "final_loss": result.history[-1]["loss"],
    }

    # samples, scored as digits.py scores them (its classifier, bandwidth and functions)
    classifier = LogisticRegression(max_iter=5000).fit(split.x_train, split.y_train)
    n = split.x_test.shape[0]
    pooled = np.concatenate([split.x_train[:n], split.x_test])
    bandwidth = float(np.median(np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)))
    k_prior, k_pc = jax.random.split(k_samples)
    z_T = sde.prior_sample(k_prior, (n, D))
    to_pixels = lambda z: jnp.clip(std.inverse(z), 0.0, 1.0)
    sets = {
        "score model, PC": to_pixels(diffusion.reverse_sde(score, sde, k_pc, z_T, config.pc_steps,
                                                           corrector_steps=config.corrector_steps, snr=config.snr)),
        "score model, ODE": to_pixels(diffusion.probability_flow(score, sde, z_T, denoise=True)),
    }
    ncsn = digits.main(digits.Config(workdir=f"{config.workdir}/ncsn", steps=config.ncsn_steps, seed=config.seed,
                                     progress=config.progress))
    out["samples"] = {
        **{name: ncsn[name] for name in ("real held-out digits", "Gaussian baseline", "NCSN + annealed Langevin")},
        **{name: digits.scores(xs, classifier, split.x_test, bandwidth) for name, xs in sets.items()},
    }
    out["classifier_test_accuracy"] = float(classifier.score(split.x_test, split.y_test))

    # classifier-free guidance
    c_apply, c_params = score_network(config, sde, num_classes=N_CLASSES)
    labelled = jnp.concatenate([z_train, jnp.asarray(split.y_train, z_train.dtype)[:, None]], axis=1)
    c_loss = lambda p, k, batch: conditional_dsm(c_apply, sde, p, k, batch, dz, config.label_dropout)
    c_result = train(config, "conditional", labelled, c_loss, c_apply, c_params)
    c_score = lambda z, t, y, params: c_apply(params, z, t, y)
    y_req = jnp.repeat(jnp.arange(N_CLASSES), config.n_per_class)
    k_prior, k_pc = jax.random.split(k_guided)
    z_T = sde.prior_sample(k_prior, (y_req.shape[0], D))
    guided_sets, out["guidance_accuracy"], out["guidance"] = {}, {}, {}
    for w in config.guidance_weights:
        xs = to_pixels(diffusion.reverse_sde(c_score, sde, k_pc, z_T, config.pc_steps, guidance=w, y=y_req,
                                             corrector_steps=config.corrector_steps, snr=config.snr,
                                             args=(c_result.ema_params,)))
        guided_sets[w] = xs
        probs = classifier.predict_proba(np.asarray(xs, np.float64))
        acc = float(np.mean(probs.argmax(1) == np.asarray(y_req)))
        out["guidance_accuracy"][str(w)] = acc
        out["guidance"][str(w)] = {"accuracy": acc,
                                   "requested_class_probability": float(np.mean(probs[np.arange(len(y_req)), np.asarray(y_req)])),
                                   **digits.scores(xs, classifier, split.x_test, bandwidth)}

    figure(workdir, split, sets, guided_sets, out, config)
    runs.save_json(workdir / "results.json", out)
    report(out)
    return out


def figure(workdir, split, sets, guided_sets, out, config: Config) -> None:
    """Real digits, PC and ODE samples, guided samples (one row per class) per w, and the bits/dim."""
    panels = 3 + len(guided_sets) + 1
    fig, axes = plt.subplots(1, panels, figsize=(3.3 * panels, 3.8))
    images = [("real held-out digits", split.x_test[:64], None)] + [(name, xs[:64], out["samples"][name]) for name, xs in sets.items()]
    for ax, (name, xs, r) in zip(axes, images):
        ax.imshow(tile_grid(xs, 8, 8), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(name if r is None else f"{name}\nIS {r['inception_score']:.2f}, MMD² {r['mmd2_to_held_out']:.4f}")
    cols = min(8, config.n_per_class)
    for ax, (w, xs) in zip(axes[3:], guided_sets.items()):
        per_class = np.asarray(xs).reshape(N_CLASSES, config.n_per_class, D)[:, :cols].reshape(-1, D)
        ax.imshow(tile_grid(per_class, N_CLASSES, cols), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"guided, w = {w:g} (rows: y = 0..9)\naccuracy {out['guidance_accuracy'][str(w)]:.3f}")
    for ax in axes[:-1]:
        ax.set_xticks([])
        ax.set_yticks([])
    bpd = out["bits_per_dim"]
    names = ["exact ODE", "Hutchinson\n(1 probe)", "Gaussian\n(full cov.)"]
    values = [bpd["score_model_exact"], bpd["score_model_hutchinson"]["mean"], bpd["gaussian_baseline"]]
    errors = [0.0, bpd["score_model_hutchinson"]["std"], 0.0]
    ax = axes[-1]
    ax.bar(names, values, yerr=errors, capsize=4, color=["tab:blue", "tab:orange", "tab:gray"])
    lo = min(values) - 0.5
    ax.set_ylim(max(0.0, lo), max(values) + 0.3)
    ax.set_ylabel("test bits/dim (dequantised, Δ = 1/16)")
    spe = out["seconds_per_example"]
    ax.set_title(f"bits/dim; s/example: exact {spe['exact']:.3f},\n"
                 f"Hutchinson {spe['hutchinson']:.4f} (± over {len(bpd['score_model_hutchinson']['per_key'])} keys)")
    plot.save(fig, workdir / "figures" / "diffusion_digits.png")


def report(out: dict) -> None:
    bpd, spe = out["bits_per_dim"], out["seconds_per_example"]
    h = bpd["score_model_hutchinson"]
    print(f"test bits/dim ({out['n_test']} digits): exact ODE {bpd['score_model_exact']:.4f} "
          f"({1e3 * spe['exact']:.1f} ms/example), Hutchinson {h['mean']:.4f} ± {h['std']:.4f} over keys "
          f"(per example ± {h['per_example_std_over_keys']:.3f}; {1e3 * spe['hutchinson']:.2f} ms/example), "
          f"Gaussian baseline {bpd['gaussian_baseline']:.4f}")
    for name, r in out["samples"].items():
        print(f"{name:26s} confidence {r['confidence']:.3f}  balance {r['class_balance']:.3f}  "
              f"IS {r['inception_score']:.2f}  MMD² {r['mmd2_to_held_out']:.4f}")
    print("guidance accuracy: " + ", ".join(f"w={w}: {a:.3f}" for w, a in out["guidance_accuracy"].items()))


if __name__ == "__main__":
    main(runs.parse_config(Config, sys.argv[1:], description=__doc__.splitlines()[0]))
