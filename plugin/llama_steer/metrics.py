"""Metrics for steering runs: where attention went, what it cost, whether text degenerated.

    roi_focus(attn, roi) ........ attention mass on ROI cells (the seeds' "ROI focus")
    entropy(p) .................. Shannon entropy (nats) of distributions along the last axis
    kl(p_logits, q_logits) ...... KL(p || q) of next-token distributions from logits (nats):
                                  "retention" of the original model under steering (seed 002)
    distinct_n(tokens, n) ....... distinct n-grams / n-grams (1 = no repetition)
    repetition_rate(tokens, n) .. 1 - distinct_n: share of repeated n-grams (degeneration)
    stutter_rate(tokens) ........ share of tokens equal to the one before ("blue blue blue")
    spearman(a, b) .............. rank correlation (ties averaged)
    bootstrap_ci(values) ........ mean and 95% percentile bootstrap interval

Arrays are float64 NumPy; attention rows (..., n_keys) sum to 1 over keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "bootstrap_ci",
    "distinct_n",
    "entropy",
    "kl",
    "repetition_rate",
    "roi_focus",
    "spearman",
    "stutter_rate",
]


def roi_focus(attn: np.ndarray, roi) -> np.ndarray:
    """Sum of attention over the ROI's key cells. attn (..., n_keys); roi: bool mask
    (n_keys,) or indices. Returns (...)."""
    attn = np.asarray(attn, dtype=float)
    roi = np.asarray(roi)
    if roi.dtype == bool:
        if roi.shape[-1] != attn.shape[-1]:
            raise ValueError(f"roi mask has {roi.shape[-1]} keys, attention rows {attn.shape[-1]}")
        return (attn * roi).sum(-1)
    return attn[..., roi.astype(int)].sum(-1)


def entropy(p: np.ndarray) -> np.ndarray:
    """H(p) = -sum p log p along the last axis (0 log 0 = 0), nats."""
    p = np.asarray(p, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p), 0.0)
    return -t.sum(-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(p) || softmax(q)) along the last axis, nats."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def distinct_n(tokens: Sequence, n: int = 2) -> float:
    """Distinct n-grams over all n-grams; 1.0 for sequences shorter than n."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 if not grams else len(set(grams)) / len(grams)


def repetition_rate(tokens: Sequence, n: int = 2) -> float:
    return 1.0 - distinct_n(tokens, n)


def stutter_rate(tokens: Sequence) -> float:
    """Tokens equal to their predecessor over all tokens after the first; 0.0 when shorter
    than 2. Fluent text that repeats phrases ("then a ... then a") scores 0; a model stuck
    on one word scores near 1."""
    if len(tokens) < 2:
        return 0.0
    return sum(a == b for a, b in zip(tokens, tokens[1:], strict=False)) / (len(tokens) - 1)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=float)
    for v in np.unique(x):  # ties: average rank
        idx = x == v
        r[idx] = r[idx].mean()
    return r


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
