"""Scores across seeds (dreamer_fast/scores.py): the IQM and stratified bootstrap intervals
of Agarwal et al. 2021, and the plot command's pooled band and final-score line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dreamer_fast.scores import iqm, mean_interval, stratified_bootstrap, summary


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm([1, 2, 3, 4]) == 2.5
    assert iqm([1, 2, 3, 1000]) == 2.5  # one outlying seed does not move it
    assert iqm([1, 2, 3, 4, 100]) == 3.0  # floor(5/4) = 1 dropped at each end
    assert iqm([1, 2, 9]) == 4.0  # fewer than 4 scores: the plain mean
    assert iqm([[1, 10], [2, 20], [3, 30], [4, 40]]) == np.mean([3, 4, 10, 20])  # all tasks
    with pytest.raises(ValueError, match="runs, tasks"):
        iqm([])


def test_iqm_equals_scipys_trimmed_mean():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (4, 5, 7, 10, 33):
        scores = rng.normal(size=(n, 3))
        assert iqm(scores) == pytest.approx(stats.trim_mean(scores, 0.25, axis=None))


def test_the_bootstrap_resamples_runs_within_each_task():
    """Task 0 scores in [0, 1], task 1 in [100, 101]: a resample that drew across tasks would
    put a task-1 score in column 0, so column 0's maximum would exceed 1."""
    rng = np.random.default_rng(1)
    scores = np.stack([rng.uniform(0, 1, 5), rng.uniform(100, 101, 5)], axis=1)
    lo, hi = stratified_bootstrap(scores, lambda s: s[:, 0].max(), reps=500)
    assert hi <= scores[:, 0].max() and lo >= scores[:, 0].min()
    lo, hi = stratified_bootstrap(scores[:, 0], np.mean, reps=2000)
    assert scores[:, 0].min() <= lo < scores[:, 0].mean() < hi <= scores[:, 0].max()
    assert stratified_bootstrap(scores, reps=300, seed=3) == stratified_bootstrap(
        scores, reps=300, seed=3)
    assert stratified_bootstrap(np.full((4, 2), 7.0)) == (7.0, 7.0)
    # More seeds, a narrower interval (the same spread of scores).
    few, many = rng.normal(size=4), rng.normal(size=64)
    width = lambda s: np.subtract(*stratified_bootstrap(s, np.mean)[::-1])
    assert width(many) < width(few)
    s = summary(scores)
    assert s["runs"] == 5 and s["iqm_lo"] <= s["iqm"] <= s["iqm_hi"]


def test_mean_interval_of_identical_curves_is_the_curve():
    curves = np.tile(np.arange(5.0), (3, 1))
    lo, hi = mean_interval(curves)
    assert lo.tolist() == hi.tolist() == list(range(5))
    lo, hi = mean_interval(np.array([[0.0, 0.0], [10.0, 20.0]]), reps=4000)
    assert lo.tolist() == [0.0, 0.0] and hi.tolist() == [10.0, 20.0]


def test_the_plot_command_prints_the_iqm_of_pooled_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from dreamer_fast.plot import main

    for i, last in enumerate([100.0, 200.0, 300.0, 5000.0]):
        folder = tmp_path / f"seed{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"env": "CartPole-v1"}))
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 100 * (k + 1), "time": 60.0 * k, "episode/return": v}) + "\n"
            for k, v in enumerate([10.0, last])))
    young = tmp_path / "young"  # one log point: pooled at the common end (step 100)
    young.mkdir()
    (young / "config.json").write_text(json.dumps({"env": "CartPole-v1"}))
    (young / "metrics.jsonl").write_text(
        json.dumps({"step": 100, "time": 0.0, "episode/return": 10.0}) + "\n")
    seeds = [str(tmp_path / f"seed{i}") for i in range(4)]
    main([*seeds, "--out", str(tmp_path / "c.png")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    lo, hi = stratified_bootstrap([100.0, 200.0, 300.0, 5000.0])
    assert line == (f"CartPole-v1: episode/return at step 200 over 4 runs: IQM 250.0 "
                    f"[{lo:.1f}, {hi:.1f}] (95% stratified bootstrap), mean 1400.0")
    main([*seeds, str(young), "--out", str(tmp_path / "c.png")])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "CartPole-v1: episode/return at step 100 over 5 runs: IQM 10.0 ")
    main([*seeds, "--out", str(tmp_path / "c.png"), "--group-by", "logdir"])
    assert "IQM" not in capsys.readouterr().out  # nothing pooled, nothing to summarise
