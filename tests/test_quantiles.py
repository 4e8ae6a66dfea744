"""The quantile sketch: shared laws, and its documented bounds against exact numpy quantiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmon
from jaxmon.estimators.quantiles import quantiles_accuracy

from laws import LawCase, LawSuite

SCALAR = jax.ShapeDtypeStruct((), jnp.float32)


class TestQuantilesLaws(LawSuite):
    # Bucket counts are integers and min/max are exact, so every merge is bit-exact.
    case = LawCase(make=lambda: jaxmon.quantiles(), exact_merge=True, weights=True)


def _streams(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Adversarial streams: order, heavy tails, duplicates, signs, zeros, tiny and huge values."""
    normal = rng.standard_normal(n)
    return {
        "sorted": np.sort(normal),
        "reversed": np.sort(normal)[::-1],
        "pareto": rng.pareto(0.7, n),  # infinite mean
        "cauchy": rng.standard_cauchy(n),
        "duplicates": rng.integers(-4, 5, n) * 0.25,
        "zeros_and_negatives": np.where(rng.random(n) < 0.3, 0.0, -rng.lognormal(0, 3, n)),
        "wide": rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-30, 30, n),
        "constant": np.full(n, 7.25),
    }


def _check_quantile_bound(fitted, x32: np.ndarray, qs: np.ndarray, alpha: float) -> None:
    got = np.asarray(jaxmon.quantile(fitted, jnp.asarray(qs, jnp.float32)), np.float64)
    exact = np.quantile(x32.astype(np.float64), qs, method="lower")
    err = np.abs(got - exact)
    bound = np.maximum(alpha * np.abs(exact), 2.0**-126)
    # float32 rounding of the representative adds at most 2^-23 relative.
    assert np.all(err <= bound * (1 + 1e-5) + 2.0**-23 * np.abs(exact)), (
        f"max relative error {np.max(err / np.maximum(np.abs(exact), 1e-300)):.3g} > {alpha:.3g}"
    )
    ends = (qs == 0) | (qs == 1)
    np.testing.assert_array_equal(got[ends], exact[ends])  # q=0 and q=1: the exact extremes


def _check_rank_bound(fitted, x32: np.ndarray, probes: np.ndarray, r: float) -> None:
    est = np.asarray(jaxmon.quantile_rank(fitted, jnp.asarray(probes, jnp.float32)), np.float64)
    xs = np.sort(x32.astype(np.float64))
    p = probes.astype(np.float32).astype(np.float64)
    slack = r * np.abs(p) * (1 + 1e-6)
    low = np.searchsorted(xs, p - slack, side="left") / len(xs)
    high = np.searchsorted(xs, p + slack, side="right") / len(xs)
    tol = 1e-6  # float32 division of counts
    assert np.all(est >= low - tol) and np.all(est <= high + tol)


QS = np.concatenate([np.linspace(0, 1, 401), [1e-4, 1e-3, 0.999, 0.9999]])


@pytest.mark.parametrize("relative_accuracy", [0.01, 0.001])
def test_quantile_and_rank_bounds_on_adversarial_streams(relative_accuracy):
    rng = np.random.default_rng(0)
    est = jaxmon.quantiles(relative_accuracy=relative_accuracy)
    f0 = jax.eval_shape(est.finalize, est.init(SCALAR))
    m = round(np.log2(f0.bucket_counts.shape[0])) - 9
    alpha = quantiles_accuracy(m)
    assert alpha <= relative_accuracy
    for name, x in _streams(rng, 12000).items():
        x32 = x.astype(np.float32)
        # Streamed in uneven batches of one fixed padded shape (one compile).
        s = est.init(SCALAR)
        for chunk in np.array_split(x32, 5):
            pad = np.zeros(3000, np.float32)
            pad[: len(chunk)] = chunk
            s = est.update(s, jnp.asarray(pad), mask=jnp.asarray(np.arange(3000) < len(chunk)))
        assert jaxmon.num_rows(s) == len(x32), name
        f = est.finalize(s)
        _check_quantile_bound(f, x32, QS, alpha)
        probes = np.concatenate([np.quantile(x32, QS), rng.choice(x32, 200)])
        _check_rank_bound(f, x32, probes, 2.0**-m)


def test_bound_after_merges_in_several_orders():
    rng = np.random.default_rng(1)
    est = jaxmon.quantiles()
    x = np.concatenate(list(_streams(rng, 4000).values())).astype(np.float32)
    rng.shuffle(x)
    parts = np.array_split(x, 8)
    states = [est.update(est.init(SCALAR), jnp.asarray(p)) for p in parts]
    orders = [list(range(8)), list(range(8))[::-1], list(rng.permutation(8))]
    merged = []
    for order in orders:
        acc = est.init(SCALAR)
        for i in order:
            acc = est.merge(acc, states[i])
        merged.append(acc)
    # A balanced tree too.
    level = states
    while len(level) > 1:
        level = [est.merge(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    merged.append(level[0])
    whole = est.update(est.init(SCALAR), jnp.asarray(x))
    for s in merged:
        for u, v in zip(jax.tree.leaves(s), jax.tree.leaves(whole), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    f = est.finalize(merged[2])
    m = round(np.log2(f.bucket_counts.shape[0])) - 9
    _check_quantile_bound(f, x, QS, quantiles_accuracy(m))


def test_any_shape_with_a_scalar_example_and_nonfinite_values():
    est = jaxmon.quantiles()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    x[0, 0, 0], x[1, 2, 3] = np.nan, -np.inf
    mask = rng.random((4, 5, 6)) < 0.8
    s = est.update(est.init(SCALAR), jnp.asarray(x), mask=jnp.asarray(mask))
    keep = mask & np.isfinite(x)
    assert jaxmon.num_rows(s) == int(keep.sum())
    assert jaxmon.num_nonfinite(s) == int((mask & ~np.isfinite(x)).sum())
    f = est.finalize(s)
    assert float(jaxmon.quantile(f, 0.0)) == x[keep].min()
    assert float(jaxmon.quantile(f, 1.0)) == x[keep].max()
    sc = est.score(f, jnp.asarray(x), mask=jnp.asarray(mask))
    assert sc.shape == x.shape
    # (1,) examples behave as scalars too.
    s1 = est.update(est.init(jax.ShapeDtypeStruct((1,), jnp.float32)), jnp.asarray(x[keep]))
    assert jaxmon.num_rows(s1) == int(keep.sum())


def test_upper_tail_is_the_conformal_p_value():
    est = jaxmon.quantiles(relative_accuracy=0.001)
    rng = np.random.default_rng(3)
    x = rng.exponential(size=5000).astype(np.float32)
    f = est.finalize(est.update(est.init(SCALAR), jnp.asarray(x)))
    v = np.quantile(x, [0.5, 0.9, 0.99, 0.999]).astype(np.float32)
    p = np.asarray(jaxmon.upper_tail(f, jnp.asarray(v)))
    r = 2.0**-10
    lo = (1 + (x[:, None] > v[None] * (1 + r)).sum(0)) / (1 + len(x))
    hi = (1 + (x[:, None] >= v[None] * (1 - r)).sum(0)) / (1 + len(x))
    assert np.all(p >= lo - 1e-6) and np.all(p <= hi + 1e-6)
    # At the largest value the p-value is the conformal floor; beyond it, the tail continues.
    assert float(jaxmon.upper_tail(f, x.max())) == pytest.approx(1 / (1 + len(x)), rel=1e-5)
    assert float(jaxmon.upper_tail(f, x.max() * 2)) < 1 / (1 + len(x))
    # The score is the surprisal of that p-value: monotone in the value.
    sc = np.asarray(est.score(f, jnp.asarray(np.sort(x))))
    assert np.all(np.diff(sc) >= -1e-5)


def _pwm_gpd(top: np.ndarray) -> tuple[float, float, float]:
    """Hosking & Wallis' PWM fit, float64, on the K values ``top`` (threshold: their minimum)."""
    u = top.min()
    y = np.sort(top - u)
    k = len(y)
    j = np.arange(1, k + 1)
    a0, a1 = y.mean(), np.mean((1 - (j - 0.35) / k) * y)
    return 2 - a0 / (a0 - 2 * a1), 2 * a0 * a1 / (a0 - 2 * a1), u


@pytest.mark.parametrize("xi", [0.15, 0.3, 0.5])
def test_tail_fit_matches_pwm_and_scipy_gpd(xi):
    from scipy import stats

    # Exceedances of a GPD over 5.0: the fitted shape must track the true one.
    x = (stats.genpareto.rvs(xi, size=40000, random_state=7) + 5.0).astype(np.float32)
    est = jaxmon.quantiles(relative_accuracy=0.001)
    f = est.finalize(est.update(est.init(SCALAR), jnp.asarray(x)))
    k = len(x) // 20
    top = np.sort(x.astype(np.float64))[-k:]
    want_xi, want_sigma_u, u = _pwm_gpd(top)
    # Float64 PWM on the exact values, against the histogram's bucketed version (0.1% buckets).
    assert float(f.tail_shape) == pytest.approx(want_xi, abs=0.03)
    want_sigma_m = want_sigma_u + want_xi * (x.max() - u)
    assert float(f.tail_scale) == pytest.approx(want_sigma_m, rel=0.05)
    # And the statistic itself: scipy's maximum-likelihood GPD fit of the same exceedances.
    mle_xi, _, _ = stats.genpareto.fit(top - u, floc=0.0)
    assert float(f.tail_shape) == pytest.approx(mle_xi, abs=0.08)
    assert abs(float(f.tail_shape) - xi) < 0.1
    # Beyond the maximum: p = 1/(n+1) times the GPD survival function of the excess.
    v = np.asarray([x.max() + 1.0, x.max() + 10.0, x.max() * 4.0], np.float32)
    got = np.asarray(jaxmon.log_upper_tail(f, jnp.asarray(v)), np.float64)
    sf = stats.genpareto.logsf(
        v.astype(np.float64) - x.max(), float(f.tail_shape), scale=float(f.tail_scale)
    )
    np.testing.assert_allclose(got, sf - np.log1p(len(x)), rtol=1e-4)


def test_p_values_beyond_the_data_stay_ordered():
    # Chi-square-like scores (light tail: the shape floor applies); values 25, 50 and 100
    # "sigmas" out must get distinct, decreasing p-values, representable in float32.
    rng = np.random.default_rng(11)
    x = rng.chisquare(8, 20000).astype(np.float32)
    est = jaxmon.quantiles()
    f = est.finalize(est.update(est.init(SCALAR), jnp.asarray(x)))
    assert float(f.tail_shape) == pytest.approx(0.1)
    v = jnp.asarray([x.max() * 0.5, x.max(), 25.0**2, 50.0**2, 100.0**2, 1e30], jnp.float32)
    p = np.asarray(jaxmon.upper_tail(f, v))
    assert np.all(np.diff(p) < 0), p
    assert p[-2] > 0.0
    lp = np.asarray(jaxmon.log_upper_tail(f, jnp.concatenate([v, jnp.asarray([3e38])])))
    assert np.all(np.diff(lp) < 0), lp
    # NaN and inf are as far out as it gets.
    assert float(jaxmon.upper_tail(f, jnp.nan)) == 0.0
    assert float(jaxmon.upper_tail(f, jnp.inf)) == 0.0


def test_empty_sketch_and_invalid_settings():
    est = jaxmon.quantiles()
    with pytest.raises(jaxmon.NotFittedError, match="holds no rows"):
        est.finalize(est.init(SCALAR))
    # Under jit nothing can raise: an empty fit answers NaN, never a confident p = 1.
    f = jax.jit(est.finalize)(est.init(SCALAR))
    assert np.isnan(float(jaxmon.quantile(f, 0.5)))
    assert float(jaxmon.quantile_rank(f, 1.0)) == 0.0
    assert np.isnan(float(jaxmon.upper_tail(f, 1.0)))
    assert np.isnan(float(est.score(f, jnp.asarray([1.0], jnp.float32))[0]))
    with pytest.raises(ValueError, match="relative_accuracy"):
        jaxmon.quantiles(relative_accuracy=0.0)
    with pytest.raises(ValueError, match="finer"):
        jaxmon.quantiles(relative_accuracy=1e-6)
    with pytest.raises(TypeError, match="QuantilesFitted"):
        jaxmon.quantile({"a": 1}, 0.5)
