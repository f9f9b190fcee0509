import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from sampletok.train.metrics import auc, gauc, logloss


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 300), st.booleans())
def test_auc_matches_sklearn(seed, n, ties):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.integers(0, 5, n).astype(float) if ties else rng.random(n)
    if y.min() == y.max():
        assert np.isnan(auc(y, s))
    else:
        assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_gauc_matches_per_user_sklearn_loop():
    rng = np.random.default_rng(0)
    n = 3000
    g = rng.integers(0, 80, n)
    y = rng.integers(0, 2, n)
    s = np.round(rng.random(n) + 0.3 * y, 2)  # with ties
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if y[m].min() != y[m].max():
            num += roc_auc_score(y[m], s[m]) * m.sum()
            den += m.sum()
    assert gauc(y, s, g) == pytest.approx(num / den, abs=1e-12)


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 2, 500), rng.random(500)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)
