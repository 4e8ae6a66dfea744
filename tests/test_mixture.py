"""Gaussian mixture by EM on a reservoir bank: against scikit-learn's GaussianMixture on the same
bank, scores against a float64 scipy evaluation of the fitted mixture, and the law suite."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture

import jaxmon

from laws import LawCase, LawSuite


class TestMixtureLaws(LawSuite):
    case = LawCase(
        make=lambda: jaxmon.gaussian_mixture(components=2, bank_size=48, iters=3, kmeans_iters=2),
        exact_merge=True,
    )


def clustered_rows(rng, n, d=4):
    """Three separated clusters with different shapes and a large common offset."""
    centres = np.array([[0.0] * d, [6.0] + [0.0] * (d - 1), [0.0, 6.0] + [0.0] * (d - 2)])
    mixes = [rng.standard_normal((d, d)) * 0.5 + np.eye(d) * s for s in (1.0, 0.6, 1.4)]
    lab = rng.integers(0, 3, n)
    z = rng.standard_normal((n, d))
    x = np.stack([z[i] @ mixes[lab[i]] + centres[lab[i]] for i in range(n)])
    return (x + 40.0).astype(np.float32)


def _reference_nll(f, q):
    """Float64 −log p(q) of the fitted mixture via scipy, and the mixture weights recovered from
    ``log_norm`` (log π_j = log_norm_j + ½(d log 2π + log det Σ_j))."""
    means = np.asarray(f.means, np.float64) + np.asarray(f.center, np.float64)
    covs = np.asarray(f.covariances, np.float64)
    d = means.shape[1]
    comps, pis = [], []
    for j in range(len(means)):
        cov = covs[j] if covs.ndim == 3 else np.diag(covs[j])
        log_pi = float(f.log_norm[j]) + 0.5 * (d * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1])
        pis.append(np.exp(log_pi))
        comps.append(log_pi + stats.multivariate_normal(means[j], cov).logpdf(q))
    return -logsumexp(np.stack(comps), axis=0), np.array(pis)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_fit_matches_scikit_learn_on_the_same_bank(covariance, rng):
    x = clustered_rows(rng, 900)
    ridge = 1e-4
    est = jaxmon.gaussian_mixture(
        components=3, bank_size=1024, iters=60, covariance=covariance, ridge=ridge
    )
    s = est.update(est.init(x[0]), jnp.asarray(x))
    bank = np.asarray(s.rows, np.float64)[np.asarray(s.filled)]
    assert len(bank) == 900  # the whole stream fits in the bank
    f = est.finalize(s)
    reg = ridge * np.mean(np.var(bank, 0))
    ref = GaussianMixture(
        3,
        covariance_type=covariance,
        reg_covar=reg,
        n_init=2,
        max_iter=300,
        tol=1e-8,
        random_state=0,
    ).fit(bank)
    ours = float(f.bank_log_likelihood)
    want = ref.score(bank)
    assert abs(ours - want) <= 0.01 * abs(want) + 0.01, (ours, want)
    # Same components (matched by their means).
    got_means = np.asarray(f.means, np.float64) + np.asarray(f.center, np.float64)
    order = [int(np.argmin(np.linalg.norm(ref.means_ - m, axis=1))) for m in got_means]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(got_means, ref.means_[order], atol=0.1)
    # Scores: −log p under our fitted parameters, against scipy in float64; and sklearn's.
    q = np.concatenate([clustered_rows(rng, 50), clustered_rows(rng, 10) + 8.0])
    want_nll, pis = _reference_nll(f, q.astype(np.float64))
    np.testing.assert_allclose(pis.sum(), 1.0, rtol=1e-4)
    got = np.asarray(est.score(f, jnp.asarray(q)))
    np.testing.assert_allclose(got, want_nll, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got, -ref.score_samples(q.astype(np.float64)), rtol=0.02, atol=0.1)


def test_fewer_bank_rows_than_stream_rows_still_fit(rng):
    x = clustered_rows(rng, 3000)
    est = jaxmon.gaussian_mixture(components=3, bank_size=512, iters=40)
    s = est.update(est.init(x[0]), jnp.asarray(x))
    assert jaxmon.num_rows(s) == 3000 and int(np.asarray(s.filled).sum()) == 512
    f = est.finalize(s)
    ref = GaussianMixture(3, n_init=1, random_state=0).fit(x.astype(np.float64))
    # A 512-row bank estimates the full-stream log-likelihood to within a few percent.
    full_ll = -np.mean(np.asarray(est.score(f, jnp.asarray(x))))
    assert abs(full_ll - ref.score(x)) <= 0.03 * abs(ref.score(x)), (full_ll, ref.score(x))


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="covariance"):
        jaxmon.gaussian_mixture(components=2, covariance="spherical")
    with pytest.raises(ValueError, match="components"):
        jaxmon.gaussian_mixture(components=9, bank_size=4)
