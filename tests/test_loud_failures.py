"""Common mistakes fail loudly, naming the function, what it returned and what was wanted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsm import samplers as S

X0 = jnp.zeros((8, 3))
KEY = jax.random.key(0)


def log_density(x):
    return -0.5 * jnp.sum(x**2)


def score(x):
    return -x


@pytest.mark.parametrize("make, match", [
    (lambda: S.ula(log_density, 0.1), r"ula's score_fn must map one chain's position of shape \(3,\) .* to shape "
                                      r"\(3,\), got \(\) \(a scalar: a log-density\?"),
    (lambda: S.annealed_langevin(lambda x, sigma: log_density(x), jnp.array([1.0, 0.5]), 2, 0.1),
     r"annealed_langevin's score_fn must map .* to shape \(3,\), got \(\)"),
    (lambda: S.mala(score, 0.1), r"mala's log_prob_fn must map one chain's position of shape \(3,\) .* to shape "
                                 r"\(\), got \(3,\) \(a log-density is a scalar"),
])
def test_a_function_of_the_wrong_kind_is_named_before_compiling(make, match):
    with pytest.raises(ValueError, match=match):
        S.run_chains(make(), KEY, X0, 5)
    if "mala" in match:
        with pytest.raises(ValueError, match=match):
            S.tune_step_size(make(), KEY, X0, 5)


def test_args_reach_the_shape_check():
    kernel = S.ula(lambda x, m: -m * jnp.sum(x), 0.1)  # its output has m's shape
    S.run_chains(kernel, KEY, X0, 2, args=(jnp.ones(3),))  # the right shapes pass
    with pytest.raises(ValueError, match=r"ula's score_fn .* got \(2,\)"):
        S.run_chains(kernel, KEY, X0, 2, args=(jnp.ones(2),))


def test_chains_that_diverge_are_counted_in_a_warning():
    """ULA on a Gaussian with a step far above its stability limit (a > 1 for s = -x): every chain explodes."""
    with pytest.warns(RuntimeWarning, match=r"run_chains: 8 of 8 chains had non-finite proposals"):
        _, _, info = S.run_chains(S.ula(lambda x: -100.0 * x, 0.5), KEY, X0 + 1.0, 200)
    assert np.all(np.asarray(info.n_nonfinite) > 0)


def test_a_tuned_step_far_from_plausible_is_reported():
    """A flat log-density accepts every proposal, so dual averaging grows the step without bound."""
    flat = lambda x: 0.0 * jnp.sum(x)
    with pytest.warns(RuntimeWarning, match=r"tune_step_size ended at step_size=.* an implausible step"):
        S.tune_step_size(S.mala(flat, 0.1), KEY, jax.random.normal(KEY, (8, 3)), 300)


# --- fit: the data, the loss's signature, resuming under other settings ------------------------

import json  # noqa: E402

import optax  # noqa: E402

import jsm  # noqa: E402

DATA = jax.random.normal(jax.random.key(1), (64, 2))
PARAMS = {"m": jnp.zeros(2)}
FIT = dict(optimizer=optax.sgd(0.1), key=jax.random.key(2), steps=4, batch_size=16, progress=False, log_every=2)


def plain_loss(p, key, batch):
    return jnp.mean(jnp.sum((batch - p["m"]) ** 2, axis=1))


def loss_with_aux(p, key, batch):
    return plain_loss(p, key, batch), {"mean_norm": jnp.mean(jnp.linalg.norm(batch, axis=1))}


@pytest.mark.parametrize("loss, kw, match", [
    (lambda p, batch: plain_loss(p, None, batch), {}, r"loss_fn must be loss\(params, key, batch\) -> loss; it cannot "
                                                      r"take 3 arguments"),
    (loss_with_aux, {}, r"got a tuple of 2 \(an array of shape \(\), a dict\); a loss returning \(loss, aux\) needs "
                        r"has_aux=True"),
    (plain_loss, {"has_aux": True}, r"-> \(loss, aux\), got an array of shape \(\); has_aux=True expects \(loss, aux\)"),
    (lambda p, k, b: jnp.sum((b - p["m"]) ** 2, axis=1), {}, r"got an array of shape \(16,\); the loss must be a scalar"),
    (lambda p, k, b: (plain_loss(p, k, b), 3.0), {"has_aux": True}, r"aux must be a dict of scalars"),
])
def test_a_loss_of_the_wrong_signature_is_named_before_compiling(loss, kw, match, compilations):
    with pytest.raises(TypeError, match=match):
        jsm.fit(loss, PARAMS, DATA, **FIT, **kw)
    assert not compilations  # refused before anything compiled


def test_data_must_be_one_finite_array():
    with pytest.raises(TypeError, match=r"data must be ONE array .* got a list of 4 items"):
        jsm.fit(plain_loss, PARAMS, [DATA[:16]] * 4, **FIT)
    with pytest.raises(ValueError, match=r"data must be finite, got 1 non-finite value"):
        jsm.fit(plain_loss, PARAMS, DATA.at[3, 1].set(jnp.inf), **FIT)


def test_a_workdir_refuses_other_settings_and_says_where_it_resumes(tmp_path, capfd):
    run = dict(FIT, workdir=str(tmp_path), checkpoint_every=2)
    jsm.fit(loss_with_aux, PARAMS, DATA, **run, has_aux=True)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("mean_norm" in r and "loss" in r for r in rows)  # the aux metrics are logged
    with pytest.raises(ValueError, match=r"other settings \(batch_size: 16 then, 32 now; ema_decay: None then, 0.9 now\)"
                                         r".*allow_changes=\('batch_size', 'ema_decay'\)"):
        jsm.fit(loss_with_aux, PARAMS, DATA, **dict(run, batch_size=32, steps=8), has_aux=True, ema_decay=0.9)
    with pytest.raises(ValueError, match=r"data_shape: \[64, 2\] then, \[32, 2\] now"):
        jsm.fit(loss_with_aux, PARAMS, DATA[:32], **dict(run, steps=8), has_aux=True)
    capfd.readouterr()
    out = jsm.fit(loss_with_aux, PARAMS, DATA, **dict(run, batch_size=32, steps=8), has_aux=True,
                  allow_changes=("batch_size",))
    assert out.step == 8 and f"fit: resuming {tmp_path} from step 4" in capfd.readouterr().err
    assert json.loads((tmp_path / "fit.json").read_text())["batch_size"] == 32  # the new settings are recorded
