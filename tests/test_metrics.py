"""Metrics against NumPy / SciPy-free references on known inputs."""

import math

import numpy as np
import pytest

from llama_steer.metrics import (
    bootstrap_ci,
    distinct_n,
    entropy,
    kl,
    repetition_rate,
    roi_focus,
    spearman,
    stutter_rate,
)


def test_roi_focus_mask_and_indices():
    attn = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    assert roi_focus(attn, np.array([False, True, True, False])) == pytest.approx([0.5, 0.5])
    assert roi_focus(attn, [3]) == pytest.approx([0.4, 0.25])
    with pytest.raises(ValueError, match="keys"):
        roi_focus(attn, np.ones(3, bool))


def test_entropy_known_values():
    assert entropy([0.5, 0.5]) == pytest.approx(math.log(2))
    assert entropy([1.0, 0.0, 0.0]) == 0.0
    assert entropy(np.full(8, 1 / 8)) == pytest.approx(math.log(8))


def test_kl_against_direct_formula():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    sp = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
    sq = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
    want = (sp * np.log(sp / sq)).sum(-1)
    np.testing.assert_allclose(kl(p, q), want, rtol=1e-10)
    np.testing.assert_allclose(kl(p, p), 0, atol=1e-12)
    np.testing.assert_allclose(kl(p + 5.0, p), 0, atol=1e-12)  # logits' shift does not matter


def test_distinct_and_repetition():
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([7, 7, 7, 7, 7], 2) == pytest.approx(1 / 4)
    assert repetition_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(1 - 2 / 5)
    assert distinct_n([1], 2) == 1.0
    assert stutter_rate("a red circle , then a blue square".split()) == 0.0
    assert stutter_rate("a blue blue blue star".split()) == pytest.approx(2 / 4)
    assert stutter_rate(["x"]) == 0.0
    rng = np.random.default_rng(3)
    t = rng.integers(0, 3, 200)
    assert stutter_rate(list(t)) == pytest.approx(float(np.mean(t[1:] == t[:-1])))


def test_spearman_matches_pearson_of_ranks():
    a = [1, 2, 3, 4, 5]
    assert spearman(a, [5, 6, 7, 8, 7]) == pytest.approx(
        np.corrcoef([0, 1, 2, 3, 4], [0, 1, 2.5, 4, 2.5])[0, 1]
    )
    assert spearman(a, a[::-1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_bootstrap_ci_brackets_the_mean():
    v = np.r_[np.ones(70), np.zeros(30)]
    mean, lo, hi = bootstrap_ci(v)
    assert mean == pytest.approx(0.7) and lo < 0.7 < hi
    assert 0.58 < lo < 0.66 and 0.74 < hi < 0.82  # binomial sd ~0.046
    assert bootstrap_ci(v, seed=1) == bootstrap_ci(v, seed=1)  # deterministic given a seed


def test_score_pictures_replace_an_earlier_runs(tmp_path):
    from llama_steer.apps.score import GazeSums, write_pictures

    rng = np.random.default_rng(0)
    first = write_pictures(GazeSums(["last"], rng.random((1, 2, 3, 6, 6)), 1), tmp_path, n_top=2)
    second = write_pictures(GazeSums(["last"], rng.random((1, 2, 3, 6, 6)), 1), tmp_path, n_top=2)
    assert sorted(tmp_path.iterdir()) == sorted(second)
    assert first[0] == second[0]  # the heatmap keeps its name
