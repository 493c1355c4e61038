"""verl's policy losses (`compute_policy_loss`) and KL estimators against numpy float64 references written here
from verl's core_algos.py (b178a3c): values, the three metrics and gradients w.r.t. logp."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimina_jax.errors import KiminaError
from kimina_jax.grpo import KL_KINDS, POLICY_LOSSES, compute_policy_loss, kl_penalty

LOW, HIGH, CLIP_C, MAX_LEN = 0.2, 0.3, 3.0, 9  # MAX_LEN > T, so sum-norm's max_len is not mistaken for T
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOSSES = ("vanilla", "gspo", "cispo", "geo_mean", "sapo", "gpg", "clip_cov", "kl_cov")
FIXED_MODE = {"gspo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean"}  # geo_mean: a mean over rows
METRICS = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")
# options that make clip_cov's pick deterministic here (candidates <= clip_num) and kl_cov's top-k > 1
OPTIONS = {"clip_cov": {"clip_cov_ratio": 0.5}, "kl_cov": {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.5}}
KINKS = np.log([1 - LOW, 1 + HIGH, CLIP_C]).tolist() + [-LOW, HIGH, 0.0]  # ratio clips, geo_mean's log clips, |d|


def rollout(lengths=(7, 5, 3, 0, 6), row_adv=(1.5, -1.0, 2.0, 0.0, -0.7), shifts=(0.45, -0.8, 0.0, 0.0, -0.05)):
    """float32 [5, 7] inputs: ragged mask with an all-masked row 3, garbage outside the mask, per-row advantages
    of both signs, log-ratios d = logp - old around a per-row shift (row 0 above 1+high, row 1 below 1-low) and
    two dual-clip tokens (A < 0, ratio > clip_c). The first seed whose masked log-ratios and row means keep 0.02
    from every clip kink (finite differences must not straddle one)."""
    B, T = len(lengths), 7
    mask = (np.arange(T)[None] < np.array(lengths)[:, None])
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        d = np.array(shifts)[:, None] + rng.normal(0.0, 0.1, (B, T))
        d[1, 0], d[4, 2] = 1.5, 1.4  # A < 0, ratio ~4.5 / 4.1 > clip_c: the dual clip
        row_mean = (d * mask).sum(1)[[0, 1, 2, 4]] / mask.sum(1)[[0, 1, 2, 4]]
        gaps = np.abs(np.concatenate([d[mask], row_mean])[:, None] - np.array(KINKS)[None]).min()
        if gaps > 0.02:
            break
    logp = rng.normal(-1.5, 1.0, (B, T))
    old = logp - d
    adv = np.repeat(np.array(row_adv)[:, None], T, 1)
    logp, old, adv = (np.where(mask, x, g) for x, g in ((logp, 1e6), (old, -1e6), (adv, 1e6)))
    weights = np.where(mask, rng.uniform(0.5, 1.5, (B, T)), 1e6)
    return tuple(x.astype(np.float32) for x in (logp, old, adv, mask, weights))


# ---- references (float64, verl's formulas written out) ----

def ref_agg(tok, m, mode, max_len=MAX_LEN):
    rows = [(t[r].sum(), r.sum()) for t, r in zip(np.where(m, tok, 0.0), m) if r.sum() > 0]
    if mode == "token-mean":
        return sum(s for s, _ in rows) / sum(n for _, n in rows)
    per_seq = {"seq-mean-token-sum": [s for s, _ in rows], "seq-mean-token-mean": [s / n for s, n in rows],
               "seq-mean-token-sum-norm": [s / max_len for s, _ in rows]}[mode]
    return float(np.mean(per_seq))


def agg_weights(m, mode, max_len=MAX_LEN):
    """d(aggregate)/d(token loss) of each token."""
    n, rows = m.sum(1, keepdims=True), (m.sum(1) > 0).sum()
    w = {"token-mean": 1.0 / m.sum(), "seq-mean-token-sum": 1.0 / rows,
         "seq-mean-token-mean": 1.0 / (np.maximum(n, 1) * rows), "seq-mean-token-sum-norm": 1.0 / (max_len * rows)}
    return np.where(m, w[mode] * np.ones(m.shape), 0.0)


def clip_cov_candidates(logp, old, adv, m, low, high, lb=1.0, ub=5.0):
    r = np.exp(logp - old)
    clipped = -adv * np.clip(r, 1 - low, 1 + high) > -adv * r
    cov = (adv - adv[m].mean()) * (logp - logp[m].mean())
    return m & ~clipped & (cov > lb) & (cov < ub), cov


def kl_cov_top(logp, adv, m, ratio):
    cov = np.where(m, (adv - adv[m].mean()) * (logp - logp[m].mean()), -np.inf)
    k = max(1, int(m.sum() * ratio))
    top = np.zeros(m.shape, bool)
    top.flat[np.argsort(-cov, axis=None)[:k]] = True
    return top, np.sort(cov[m])[::-1]


def ref_policy(name, logp, old, adv, mask, mode, low=LOW, high=HIGH, c=CLIP_C, weights=None, select=None, **opt):
    """(loss, metrics); `select` fixes clip_cov's zeroed tokens / kl_cov's top-k (else computed here)."""
    m = mask > 0
    logp, old, adv = (np.where(m, np.asarray(x, np.float64), 0.0) for x in (logp, old, adv))
    w = np.ones(m.shape) if weights is None else np.where(m, np.asarray(weights, np.float64), 1.0)
    d = logp - old
    dc = np.clip(d, -20, 20)
    r = np.exp(dc)
    met = {"pg_clipfrac": 0.0 * d, "pg_clipfrac_lower": 0.0 * d, "ppo_kl": -dc}
    mode = FIXED_MODE.get(name, mode)
    if name == "vanilla":
        pg1, pg2 = -adv * r, -adv * np.clip(r, 1 - low, 1 + high)
        tok = np.maximum(pg1, pg2)
        met["pg_clipfrac"] = pg2 > pg1
        met["pg_clipfrac_lower"] = (adv < 0) & (tok > -adv * c)
        tok = np.where(adv < 0, np.minimum(tok, -adv * c), tok)
    elif name == "gspo":
        seq = (d * m).sum(1) / np.maximum(m.sum(1), 1)
        s = np.exp(np.minimum(seq, 10.0))[:, None] * np.ones(m.shape)
        pg1, pg2 = -adv * s, -adv * np.clip(s, 1 - low, 1 + high)
        tok, met["pg_clipfrac"], met["ppo_kl"] = np.maximum(pg1, pg2), pg2 > pg1, -d
    elif name == "cispo":
        cr = np.clip(r, 1 - low, 1 + high)
        tok, met["pg_clipfrac"] = -cr * adv * logp, cr != r
    elif name == "sapo":
        tau = np.where(adv > 0, opt.get("tau_pos", 1.0), opt.get("tau_neg", 1.05))
        tok = -(4.0 / tau) / (1.0 + np.exp(-tau * (r - 1.0))) * adv
    elif name == "gpg":
        tok, met["ppo_kl"] = -logp * adv, -d
    elif name == "geo_mean":
        outside = (d < -low) | (d > high)
        kept = np.where(adv > 0, np.minimum(d, high), np.where(adv < 0, np.maximum(d, -low), 0.0))
        per_seq = []
        for i in np.flatnonzero(m.sum(1) > 0):
            row = m[i]
            seq_w = np.exp(np.log(w[i][row] + 1e-10).mean())
            per_seq.append(-adv[i][row].mean() * np.exp(kept[i][row].mean()) * seq_w)
        met = {"pg_clipfrac": outside & (adv > 0), "pg_clipfrac_lower": outside & (adv < 0), "ppo_kl": -d}
        return float(np.mean(per_seq)), {k: float(v[m].mean()) for k, v in met.items()}
    elif name == "clip_cov":
        ru = np.exp(d)
        zeroed = clip_cov_candidates(logp, old, adv, m, low, high, opt.get("clip_cov_lb", 1.0),
                                     opt.get("clip_cov_ub", 5.0))[0] if select is None else select
        if select is None:  # a deterministic pick only: every candidate
            assert 0 < zeroed.sum() <= max(int(opt.get("clip_cov_ratio", 0.0002) * m.sum()), 1)
        tok = np.maximum(-adv * ru, -adv * np.clip(ru, 1 - low, 1 + high)) * ~zeroed
        met["pg_clipfrac"], met["ppo_kl"] = zeroed, -d
    elif name == "kl_cov":
        top = kl_cov_top(logp, adv, m, opt.get("kl_cov_ratio", 0.0002))[0] if select is None else select
        tok = -adv * np.exp(d) + top * opt.get("ppo_kl_coef", 0.1) * np.abs(d)
        met["ppo_kl"] = np.abs(d)
    return ref_agg(tok * w, m, mode), {k: float(np.asarray(v, np.float64)[m].mean()) for k, v in met.items()}


def ref_grad(name, logp, old, adv, mask, mode, weights=None, select=None, **opt):
    """d loss / d logp: by hand for the stop-gradient losses (gspo, cispo), else central differences."""
    m = mask > 0
    w = np.ones(m.shape) if weights is None else np.where(m, weights.astype(np.float64), 0.0)
    lp64, old64, adv64 = (np.where(m, x.astype(np.float64), 0.0) for x in (logp, old, adv))
    if name == "cispo":  # loss = -sg(clip(ratio)) * A * logp
        cr = np.clip(np.exp(np.clip(lp64 - old64, -20, 20)), 1 - LOW, 1 + HIGH)
        return np.where(m, -cr * adv64 * w * agg_weights(m, mode), 0.0)
    if name == "gspo":  # d s_t / d logp_t = s (value exp(sg seq mean)); 0 where the clipped branch is taken
        seq = ((lp64 - old64) * m).sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1)
        s = np.exp(np.minimum(seq, 10.0)) * np.ones(m.shape)
        live = ~(-adv64 * np.clip(s, 1 - LOW, 1 + HIGH) > -adv64 * s) & (seq < 10.0)
        return np.where(m & live, -adv64 * s * w * agg_weights(m, "seq-mean-token-mean"), 0.0)
    grad, eps = np.zeros(m.shape), 1e-6
    for i, t in zip(*np.nonzero(m)):
        plus, minus = lp64.copy(), lp64.copy()
        plus[i, t] += eps
        minus[i, t] -= eps
        f = [ref_policy(name, x, old64, adv64, mask, mode, weights=weights, select=select, **opt)[0]
             for x in (plus, minus)]
        grad[i, t] = (f[0] - f[1]) / (2 * eps)
    return grad


def ours(name, logp, old, adv, mask, mode="token-mean", low=LOW, high=HIGH, c=CLIP_C, **opt):
    def f(lp):
        return compute_policy_loss(name, lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), agg_mode=mode,
                                   clip_low=low, clip_high=high, clip_c=c, max_len=MAX_LEN, **opt)
    loss, metrics = f(jnp.asarray(logp))
    grad = np.asarray(jax.grad(lambda lp: f(lp)[0])(jnp.asarray(logp)))
    assert set(metrics) == set(METRICS)
    return float(loss), {k: float(v) for k, v in metrics.items()}, grad


def check(name, got, want, grad=None, want_grad=None, mask=None):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6, err_msg=f"{name} loss")
    for k in METRICS:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    if want_grad is not None:
        assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0), f"{name}: grad outside the mask"
        np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6, err_msg=f"{name} grad")


# ---- policy losses ----

def test_registry():
    assert set(POLICY_LOSSES) == set(LOSSES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_metrics_and_gradient_match_verl(name, mode):
    logp, old, adv, mask, _ = rollout()
    opt = OPTIONS.get(name, {})
    got = ours(name, logp, old, adv, mask, mode, **opt)
    want = ref_policy(name, logp, old, adv, mask, mode, **opt)
    check(name, got[:2], want, got[2], ref_grad(name, logp, old, adv, mask, mode, **opt), mask)
    if name in ("vanilla", "gspo", "cispo", "geo_mean"):  # the inputs reach the clips the metrics count
        assert want[1]["pg_clipfrac"] > 0
    if name in ("vanilla", "geo_mean"):
        assert want[1]["pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("name, bound", [(n, b) for n in ("vanilla", "gspo", "cispo", "geo_mean", "clip_cov")
                                         for b in ("high", "low")] + [("vanilla", "c")])
def test_a_wrong_clip_bound_is_caught(name, bound):
    """The inputs exercise each bound: the reference with a slightly different bound is far from ours."""
    logp, old, adv, mask, _ = rollout()
    opt = OPTIONS.get(name, {})
    got = ours(name, logp, old, adv, mask, "token-mean", **opt)[0]
    wrong = {"high": dict(high=0.28), "low": dict(low=0.22), "c": dict(c=2.8)}[bound]
    zeroed = None
    if name == "clip_cov":
        zeroed = clip_cov_candidates(np.where(mask > 0, logp, 0.0).astype(np.float64), np.where(mask > 0, old, 0.0),
                                     np.where(mask > 0, adv, 0.0), mask > 0, LOW, HIGH)[0]
    bad = ref_policy(name, logp, old, adv, mask, "token-mean", select=zeroed, **wrong, **opt)[0]
    assert abs(bad - got) > 1e-3 * max(abs(got), 1e-2), (name, bound, got, bad)


@pytest.mark.parametrize("name", ("sapo", "gpg", "kl_cov"))
def test_losses_without_a_clip_ignore_the_bounds(name):
    logp, old, adv, mask, _ = rollout()
    a = ours(name, logp, old, adv, mask, **OPTIONS.get(name, {}))
    b = ours(name, logp, old, adv, mask, low=0.05, high=0.05, c=1.5, **OPTIONS.get(name, {}))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_rollout_is_weights_multiply_each_token(name):
    """geo_mean: per sequence, the geometric mean of its tokens' weights (verl)."""
    logp, old, adv, mask, weights = rollout()
    opt = OPTIONS.get(name, {})
    got = ours(name, logp, old, adv, mask, "seq-mean-token-sum", rollout_is_weights=jnp.asarray(weights), **opt)
    want = ref_policy(name, logp, old, adv, mask, "seq-mean-token-sum", weights=weights, **opt)
    plain = ref_policy(name, logp, old, adv, mask, "seq-mean-token-sum", **opt)[0]
    assert abs(want[0] - plain) > 1e-3 * abs(plain)
    check(name, got[:2], want, got[2],
          ref_grad(name, logp, old, adv, mask, "seq-mean-token-sum", weights=weights, **opt), mask)


@pytest.mark.parametrize("name", LOSSES)
def test_extreme_log_ratios_use_verls_clamps(name):
    """|log-ratio| 25, 30: vanilla/cispo/sapo clamp it to 20 (ppo_kl too); gspo clamps its sequence log-ratio at 10
    (row 2); geo_mean, clip_cov and kl_cov take it unclamped (verl)."""
    d = np.array([[25.0, -25.0, 0.1, 0.05], [30.0, 0.2, 0.1, -0.1], [10.5, 10.5, 10.5, 10.5]])
    logp = np.array([-1.0, -0.5, -2.0, -1.5]) + np.array([[0.0], [0.3], [-0.2]])
    old, adv, mask = logp - d, np.repeat([[1.0], [-2.0], [-0.5]], 4, 1), np.ones((3, 4))
    opt = OPTIONS.get(name, {}) if name != "clip_cov" else {"clip_cov_lb": 100.0, "clip_cov_ub": 200.0}
    args = [x.astype(np.float32) for x in (logp, old, adv, mask)]
    got = ours(name, *args, "seq-mean-token-mean", **opt)
    want = ref_policy(name, *args, "seq-mean-token-mean", select=np.zeros((3, 4), bool) if name == "clip_cov"
                      else None, **opt)
    if name == "gpg":  # verl's gpg has no ppo_kl: which clamp ours takes is not verl's to say
        got[1]["ppo_kl"] = want[1]["ppo_kl"]
    check(name, got[:2], want)
    if name == "gspo":  # row 2 is past the clamp: no gradient
        assert np.all(got[2][2] == 0) and np.all(np.isfinite(got[2]))


@pytest.mark.parametrize("name", LOSSES)
def test_no_masked_token_gives_zero(name):
    logp, old, adv, mask, _ = rollout()
    got = ours(name, logp, old, adv, np.zeros_like(mask), **OPTIONS.get(name, {}))
    assert got[0] == 0.0 and all(v == 0.0 for v in got[1].values()) and np.all(got[2] == 0)


def test_clip_cov_zeroes_clip_num_random_candidates():
    logp, old, adv, mask, _ = rollout()
    m = mask > 0
    opt = {"clip_cov_ratio": 0.1, "clip_cov_lb": 0.1}  # clip_num = int(0.1 * 21) = 2 of 5 candidates
    cand, cov = clip_cov_candidates(*(np.where(m, x, 0.0).astype(np.float64) for x in (logp, old, adv)), m, LOW,
                                    HIGH, lb=0.1)
    clip_num = max(int(0.1 * m.sum()), 1)
    assert clip_num == 2 and cand.sum() >= 4 and np.abs(cov[m] - 0.1).min() > 1e-3
    picks = set()
    for key in range(6):
        loss, metrics, grad = ours("clip_cov", logp, old, adv, mask, rng=jax.random.PRNGKey(key), **opt)
        zeroed = cand & (grad == 0)  # a candidate kept has gradient -A * ratio / N != 0
        assert zeroed.sum() == clip_num and round(metrics["pg_clipfrac"] * m.sum()) == clip_num
        want = ref_policy("clip_cov", logp, old, adv, mask, "token-mean", select=zeroed, **opt)
        check("clip_cov", (loss, metrics), want)
        picks.add(tuple(np.flatnonzero(zeroed)))
    assert len(picks) > 1  # the key drives the pick
    default = [ours("clip_cov", logp, old, adv, mask, **opt)[0] for _ in range(2)]
    assert default[0] == default[1]  # default: a fixed key


def test_clip_cov_defaults_and_deterministic_pick():
    logp, old, adv, mask, _ = rollout()
    m = mask > 0
    cand, cov = clip_cov_candidates(*(np.where(m, x, 0.0).astype(np.float64) for x in (logp, old, adv)), m, LOW,
                                    HIGH)
    assert np.abs(cov[m] - 1.0).min() > 1e-3 and cand.sum() >= 2
    got = ours("clip_cov", logp, old, adv, mask, clip_cov_ratio=0.5)
    assert round(got[1]["pg_clipfrac"] * m.sum()) == cand.sum()  # all candidates zeroed
    one = ours("clip_cov", logp, old, adv, mask)  # default ratio 0.0002: clip_num 1
    assert round(one[1]["pg_clipfrac"] * m.sum()) == 1 and (cand & (one[2] == 0)).sum() == 1
    ub = ours("clip_cov", logp, old, adv, mask, clip_cov_ratio=0.5, clip_cov_ub=float(np.sort(cov[cand])[-1]) - 1e-3)
    assert round(ub[1]["pg_clipfrac"] * m.sum()) == cand.sum() - 1  # the upper bound excludes the largest


@pytest.mark.parametrize("ratio", (None, 0.2, 0.3))
def test_kl_cov_penalises_exactly_the_top_k_covariances(ratio):
    logp, old, adv, mask, _ = rollout()
    m = mask > 0
    opt = {} if ratio is None else {"kl_cov_ratio": ratio}
    top, sorted_cov = kl_cov_top(np.where(m, logp, 0.0).astype(np.float64), np.where(m, adv, 0.0), m,
                                 opt.get("kl_cov_ratio", 0.0002))
    k = top.sum()
    assert k == max(1, int(21 * opt.get("kl_cov_ratio", 0.0002))) and sorted_cov[k - 1] - sorted_cov[k] > 1e-3
    loss, metrics, grad = ours("kl_cov", logp, old, adv, mask, **opt)
    d = np.where(m, logp - old, 0.0).astype(np.float64)
    plain = np.where(m, -adv * np.exp(d) / m.sum(), 0.0)  # token-mean gradient of -A * ratio
    penalised = np.abs(grad - plain) > 1e-5
    np.testing.assert_array_equal(penalised, top)
    np.testing.assert_allclose((grad - plain)[top], 0.1 * np.sign(d[top]) / m.sum(), rtol=1e-4)  # default coef
    check("kl_cov", (loss, metrics), ref_policy("kl_cov", logp, old, adv, mask, "token-mean", **opt))


def test_sapo_temperatures():
    logp, old, adv, mask, _ = rollout()
    for opt in ({"tau_pos": 2.0}, {"tau_neg": 0.5}, {"tau_pos": 0.7, "tau_neg": 3.0}):
        got = ours("sapo", logp, old, adv, mask, **opt)
        check("sapo", got[:2], ref_policy("sapo", logp, old, adv, mask, "token-mean", **opt), got[2],
              ref_grad("sapo", logp, old, adv, mask, "token-mean", **opt), mask)
        assert abs(got[0] - ref_policy("sapo", logp, old, adv, mask, "token-mean")[0]) > 1e-3


# ---- errors ----

@pytest.mark.parametrize("name, option", [("vanilla", "tau_pos"), ("vanilla", "rng"), ("gspo", "clip_cov_ratio"),
                                          ("sapo", "ppo_kl_coef"), ("kl_cov", "tau_neg"), ("clip_cov", "kl_cov_ratio"),
                                          ("cispo", "clip_cov_lb"), ("gpg", "no_such_option")])
def test_an_option_the_loss_does_not_take_is_refused(name, option):
    logp, old, adv, mask, _ = rollout()
    with pytest.raises(KiminaError, match=option):
        compute_policy_loss(name, logp, old, adv, mask, agg_mode="token-mean", clip_low=LOW, clip_high=HIGH,
                            **{option: 1.0})


def test_an_unknown_loss_is_refused():
    logp, old, adv, mask, _ = rollout()
    with pytest.raises(KiminaError, match="ppo_magic"):
        compute_policy_loss("ppo_magic", logp, old, adv, mask, agg_mode="token-mean", clip_low=LOW, clip_high=HIGH)


# ---- KL estimators ----

def ref_kl(logp, ref, kind):
    """(value, d value / d logp) of verl's estimator; a trailing '+' takes the value of the base estimator and
    the gradient of k2 (straight-through)."""
    d, base = logp - ref, kind.rstrip("+")
    x = np.clip(-d, -20, 20)
    value, grad = {"k1": (d, np.ones_like(d)), "kl": (d, np.ones_like(d)), "abs": (np.abs(d), np.sign(d)),
                   "k2": (0.5 * d * d, d), "mse": (0.5 * d * d, d),
                   "k3": (np.exp(x) - x - 1, 1 - np.exp(x)), "low_var_kl": (np.exp(x) - x - 1, 1 - np.exp(x))}[base]
    live = (np.abs(-d) < 20) & (np.abs(value) < 10) if base in ("k3", "low_var_kl") else np.ones(d.shape, bool)
    value = np.clip(value, -10, 10) if base in ("k3", "low_var_kl") else value
    return value, (d if kind.endswith("+") else np.where(live, grad, 0.0))


def test_kl_kinds_include_the_straight_through_ones():
    assert {"k1+", "k3+", "low_var_kl+", "kl+", "abs+", "k2+", "mse+"} <= set(KL_KINDS)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_penalty_value_and_gradient(kind):
    rng = np.random.default_rng(3)
    logp = rng.normal(-1.5, 1.0, (3, 6)).astype(np.float32)
    ref = logp + rng.normal(0.0, 0.7, (3, 6)).astype(np.float32)
    ref[0, :4] = logp[0, :4] + np.array([25.0, -25.0, 3.0, -4.0], np.float32)  # k3's clamps at 20 and 10
    want, want_grad = ref_kl(logp.astype(np.float64), ref.astype(np.float64), kind)
    got = np.asarray(kl_penalty(jnp.asarray(logp), jnp.asarray(ref), kind))
    grad = np.asarray(jax.grad(lambda lp: kl_penalty(lp, jnp.asarray(ref), kind).sum())(jnp.asarray(logp)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_unknown_kl_kind_is_refused():
    with pytest.raises(KiminaError, match="k4"):
        kl_penalty(jnp.zeros(3), jnp.zeros(3), "k4")
