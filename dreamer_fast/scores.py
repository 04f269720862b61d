"""Scores across seeds, as Agarwal et al. 2021 ("Deep RL at the edge of the statistical
precipice") recommend reporting them: the interquartile mean (IQM) and percentile intervals
from a stratified bootstrap (runs resampled with replacement within each task).

The definitions follow the paper's library (google-research/rliable, `aggregate_iqm` and
`StratifiedBootstrap`); they are written here with numpy because that library pulls in
arch, scipy, pandas, seaborn and absl-py for these two functions. tests/test_scores.py checks
the IQM against scipy's trimmed mean when scipy is installed.

Scores are (runs, tasks): runs are seeds, tasks are envs; a 1-D array is one task.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def _matrix(scores) -> np.ndarray:
    a = np.asarray(scores, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"scores must be (runs, tasks) with at least one of each, got shape "
                         f"{np.shape(scores)}")
    return a


def iqm(scores) -> float:
    """Interquartile mean over every score of every run and task: the mean of the middle
    half after dropping floor(n/4) scores at each end (n = runs x tasks; below 4 scores, the
    plain mean). Robust to one outlying seed, and uses more of the data than the median."""
    flat = np.sort(_matrix(scores), axis=None)
    cut = int(0.25 * flat.size)
    return float(flat[cut:flat.size - cut].mean())


def stratified_bootstrap(scores, statistic: Callable[[np.ndarray], float] = iqm,
                         reps: int = 2000, size: float = 0.95,
                         seed: int = 0) -> tuple[float, float]:
    """The `size` percentile interval of `statistic` over `reps` resamples of `scores`
    (runs, tasks), each task's runs drawn with replacement from that task's own runs (the
    stratification: a resample never moves a score to another task). Reproducible by seed."""
    a = _matrix(scores)
    runs, tasks = a.shape
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(reps, runs, tasks))
    samples = np.take_along_axis(a[None].repeat(reps, 0), idx, axis=1)
    values = np.array([statistic(s) for s in samples])
    tail = (1.0 - size) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def mean_interval(curves: np.ndarray, reps: int = 2000, size: float = 0.95,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise bootstrap interval of the mean of `curves` (runs, points): the band a plot
    draws around N seeds' mean curve (runs resampled with replacement at every point
    together, so one resample is a set of whole curves)."""
    c = np.asarray(curves, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, c.shape[0], size=(reps, c.shape[0]))
    means = c[idx].mean(1)  # (reps, points)
    tail = (1.0 - size) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail], axis=0)
    return lo, hi


def summary(scores, reps: int = 2000, seed: int = 0) -> dict:
    """{runs, mean, iqm, iqm_lo, iqm_hi} of (runs, tasks) scores (95% stratified bootstrap
    interval of the IQM)."""
    a = _matrix(scores)
    lo, hi = stratified_bootstrap(a, iqm, reps=reps, seed=seed)
    return {"runs": a.shape[0], "mean": float(a.mean()), "iqm": iqm(a), "iqm_lo": lo,
            "iqm_hi": hi}
