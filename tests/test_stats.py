"""The statistics and the ensemble selection as pure functions (stats.py, selection.py).

Each figure is checked against a case worked out by hand, or against a plain loop written
independently here (sklearn's f1_score per resample, the same RNG stream).
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ser_hpc.ensemble.analysis import Pool, SplitStats
from ser_hpc.ensemble.collect import ProbTable
from ser_hpc.ensemble.combine import combine
from ser_hpc.ensemble.selection import crossfit, greedy, halves, topk
from ser_hpc.ensemble.stats import (N_RESAMPLES, SEED, bootstrap_ci, bootstrap_distribution, chance_macro_f1, ece,
                                    macro_f1_batch, paired_p, reliability, stratified_resamples)


def paired_test(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_classes: int,
                n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """paired_p on predictions: each side one (n,) vector or a stack (S, n) of seed runs (a helper
    of these tests only; the library pairs runs through analysis.SplitStats).

    A stack stands for a configuration: its statistic is the mean macro-F1 over its runs,
    so a configuration is compared by what a typical seed gets, not by its luckiest one.
    """
    y = np.asarray(y)
    idx = stratified_resamples(y, n_resamples, seed)

    def side(pred):
        pred = np.atleast_2d(np.asarray(pred))
        return bootstrap_distribution(y, pred, idx, n_classes).mean(0), float(macro_f1_batch(y, pred, n_classes).mean())

    (da, pa), (db, pb) = side(pred_a), side(pred_b)
    return paired_p(da, db, pa, pb)


def sk_macro(y, pred, c):
    """sklearn's macro-F1 over the classes present in y (absent ones are left out, not 0)."""
    return f1_score(y, pred, labels=sorted(set(np.asarray(y).tolist())), average="macro", zero_division=0)


# ----------------------------------------------------------------------- macro-F1 batch

def test_macro_f1_batch_matches_sklearn_including_absent_classes():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, size=80)  # class 5 of 6 never occurs: left out of the average, like metrics.score
    preds = rng.integers(0, 6, size=(7, 80))
    got = macro_f1_batch(y, preds, 6)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, [sk_macro(y, p, 6) for p in preds], atol=1e-12)
    from ser_hpc.metrics import score
    names = ["a", "b", "c", "d", "e", "f"]
    np.testing.assert_allclose(got, [score(y, p, names)["macro_f1"] for p in preds], atol=1e-12)
    assert score(y, preds[0], names)["absent"] == ["f"] and score(y, preds[0], names)["per_class_f1"]["f"] is None
    assert macro_f1_batch(y, y, 6) == pytest.approx(1.0)  # perfect on the 5 classes present: the absent one is not a 0


# ------------------------------------------------------------------------ bootstrap CI

def test_stratified_resamples_keep_class_counts_and_draw_within_class():
    y = np.array([0] * 5 + [1] * 3 + [4] * 2)
    idx = stratified_resamples(y, 200, seed=3)
    assert idx.shape == (200, 10)
    np.testing.assert_array_equal(np.sort(y[idx], axis=1), np.tile(np.sort(y), (200, 1)))
    assert len({tuple(r) for r in idx}) > 150  # real resamples, not one repeated row
    np.testing.assert_array_equal(idx, stratified_resamples(y, 200, seed=3))  # fixed seed: reproducible


def test_bootstrap_ci_on_a_case_worked_out_by_hand():
    # Class 0 has two items, one right (a) and one wrong (b, predicted 1); class 1 has two
    # right items. Resampling class 0 gives {a,a}, {a,b}, {b,a}, {b,b} with probability 1/4
    # each (class 1 is always right):
    #   {a,a}: perfect                                    -> 1
    #   {a,b}: F1_0 = 2/(2+1) = 2/3, F1_1 = 4/(4+1) = 4/5  -> 11/15
    #   {b,b}: F1_0 = 0,             F1_1 = 4/(4+2) = 2/3  -> 1/3
    y, pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    idx = stratified_resamples(y, 4000, seed=0)
    dist = bootstrap_distribution(y, pred, idx, 2)
    values, counts = np.unique(np.round(dist, 12), return_counts=True)
    np.testing.assert_allclose(values, [1 / 3, 11 / 15, 1])
    np.testing.assert_allclose(counts / 4000, [0.25, 0.5, 0.25], atol=0.03)
    # Each outer value holds a quarter of the mass, well over 2.5 %: the 95 % interval is [1/3, 1].
    assert bootstrap_ci(y, pred, 2, n_resamples=1000) == pytest.approx((1 / 3, 1.0))


def test_bootstrap_ci_equals_an_independent_loop_with_the_same_rng():
    rng = np.random.default_rng(7)
    y = rng.permutation(np.r_[np.zeros(30), np.ones(12), np.full(5, 2), np.full(2, 5)].astype(int))
    pred = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, 6, len(y)))
    b, seed = 300, 11

    # The loop: for each class (sorted), one draw of that class's items per resample, from
    # one generator in that order; then sklearn's macro-F1 of each resample.
    loop_rng = np.random.default_rng(seed)
    picks = {}
    for c in sorted(set(y.tolist())):
        pos = np.flatnonzero(y == c)
        picks[c] = [pos[loop_rng.integers(0, len(pos), size=len(pos))] for _ in range(b)]
    scores = []
    for i in range(b):
        items = np.concatenate([picks[c][i] for c in sorted(picks)])
        scores.append(sk_macro(y[items], pred[items], 6))
    want = np.quantile(scores, [0.025, 0.975])
    assert bootstrap_ci(y, pred, 6, n_resamples=b, seed=seed) == pytest.approx(tuple(want), abs=1e-12)


# --------------------------------------------------------------------------- paired test

def test_paired_test_identical_systems_give_p_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 6, 200))
    res = paired_test(y, pred, pred.copy(), 6)
    assert res["delta"] == 0 and res["p"] == 1.0 and res["delta_ci95"] == [0.0, 0.0]


def test_paired_test_clearly_better_system_gives_small_p_and_is_symmetric():
    rng = np.random.default_rng(1)
    y = rng.permutation(np.arange(300) % 6)
    good = np.where(rng.random(300) < 0.9, y, (y + 1) % 6)
    bad = np.where(rng.random(300) < 0.45, y, (y + 2) % 6)
    res = paired_test(y, good, bad, 6, n_resamples=1000)
    assert res["delta"] == pytest.approx(sk_macro(y, good, 6) - sk_macro(y, bad, 6))
    assert res["delta"] > 0.3 and res["p"] < 0.01 and res["delta_ci95"][0] > 0
    back = paired_test(y, bad, good, 6, n_resamples=1000)
    assert back["delta"] == pytest.approx(-res["delta"]) and back["p"] == res["p"]


def test_paired_test_tiny_difference_is_not_significant():
    rng = np.random.default_rng(2)
    y = rng.permutation(np.arange(300) % 6)
    a = np.where(rng.random(300) < 0.7, y, (y + 1) % 6)
    b = a.copy()
    flip = np.flatnonzero(a == y)[:2]  # b is wrong on two more items out of 300
    b[flip] = (y[flip] + 3) % 6
    res = paired_test(y, a, b, 6)
    assert 0 < res["delta"] < 0.02 and res["p"] > 0.2


def test_paired_test_of_a_configuration_uses_its_mean_over_seeds():
    rng = np.random.default_rng(3)
    y = rng.permutation(np.arange(240) % 6)
    seeds = np.stack([np.where(rng.random(240) < q, y, (y + 1) % 6) for q in (0.8, 0.6, 0.7)])
    other = np.where(rng.random(240) < 0.5, y, (y + 2) % 6)
    res = paired_test(y, seeds, other, 6)
    want = np.mean([sk_macro(y, s, 6) for s in seeds]) - sk_macro(y, other, 6)
    assert res["delta"] == pytest.approx(want)


# ---------------------------------------------------------------------------- calibration

def test_ece_on_a_case_worked_out_by_hand():
    probs = np.array([[0.90, 0.05, 0.05],   # conf 0.90, right  -> bin 13 (13/15, 14/15]
                      [0.90, 0.05, 0.05],   # conf 0.90, wrong  -> bin 13
                      [0.19, 0.62, 0.19],   # conf 0.62, right  -> bin 9  (9/15, 10/15]
                      [0.50, 0.30, 0.20]])  # conf 0.50, right  -> bin 7  (7/15, 8/15]
    y = np.array([0, 1, 1, 0])
    # bin 13: |0.5 - 0.9| * 2/4 = 0.2;  bin 9: |1 - 0.62| * 1/4 = 0.095;  bin 7: |1 - 0.5| * 1/4 = 0.125
    assert ece(probs, y) == pytest.approx(0.2 + 0.095 + 0.125)
    rel = reliability(probs, y)
    assert rel["count"][13] == 2 and rel["count"][9] == 1 and rel["count"][7] == 1 and sum(rel["count"]) == 4
    assert rel["accuracy"][13] == 0.5 and rel["confidence"][9] == pytest.approx(0.62)
    # Calibrated: confidence 0.8 on five items, four of them right.
    cal = np.tile([0.8, 0.1, 0.1], (5, 1))
    assert ece(cal, np.array([0, 0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # A confidence of exactly 1 lands in the last bin, not past it.
    assert reliability(np.array([[1.0, 0.0]]), np.array([0]))["count"][14] == 1


# -------------------------------------------------------------------------------- chance

def test_chance_levels_by_hand_and_by_simulation():
    y = np.array([0] * 6 + [1] * 3 + [2])  # shares 0.6, 0.3, 0.1 over 3 classes
    want_uniform = np.mean([2 * p / (1 + 3 * p) for p in (0.6, 0.3, 0.1)])
    c = chance_macro_f1(y, 3)
    assert c["uniform"] == pytest.approx(want_uniform) and c["majority"] == pytest.approx(2 * 0.6 / 1.6 / 3)
    assert c["majority"] == pytest.approx(sk_macro(y, np.zeros_like(y), 3))
    assert chance_macro_f1(np.arange(60) % 6, 6)["uniform"] == pytest.approx(1 / 6)
    # The formula is the F1 of the expected counts; the simulated mean of uniform guessing is close.
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), [180, 110, 60, 55, 50, 5])
    sim = macro_f1_batch(y, rng.integers(0, 6, size=(2000, len(y))), 6).mean()
    assert chance_macro_f1(y, 6)["uniform"] == pytest.approx(sim, abs=0.01)


# ------------------------------------------------------------------------------ selection

def two_class(p1):
    """(R, n, 2) probabilities from P(class 1) per model and item."""
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], axis=-1)


def weighted_case():
    """A is the best model alone, B the worst, and only 2 A + 1 B gets every item right.

    Item types (gold; P(class 1) from A, from B): X (1; .7, .2), Y (0; .6, .1),
    Z (1; .4, .9), W (0; .3, .8). A is right on X and W, B on Y and Z, their plain mean
    (like B) on Y and Z only, and (2A + B)/3 on all four.
    """
    kinds = {"X": (1, 0.7, 0.2), "Y": (0, 0.6, 0.1), "Z": (1, 0.4, 0.9), "W": (0, 0.3, 0.8)}
    counts = {"X": 30, "Y": 20, "Z": 20, "W": 30}
    y, a, b = [], [], []
    for k, n in counts.items():
        g, pa, pb = kinds[k]
        y += [g] * n
        a += [pa] * n
        b += [pb] * n
    return np.array(y), two_class([a, b])


def test_greedy_selects_with_replacement_and_beats_top1():
    y, probs = weighted_case()
    single = [macro_f1_batch(y, p.argmax(-1), 2) for p in probs]
    assert single[0] > single[1]
    bag, trace = greedy(probs, y, "mean")
    assert sorted(bag) == [0, 0, 1]  # A twice: with replacement
    assert trace[0] == pytest.approx(single[0]) and max(trace) == 1.0
    score = macro_f1_batch(y, combine(probs[bag], "mean")[1], 2)
    assert score == 1.0 > single[0]
    # the plain top-2 mean is worse than A alone: greedy finds what top-k cannot
    assert macro_f1_batch(y, combine(probs[topk(probs, y, 2)], "mean")[1], 2) < single[0]
    # brute force over every bag of up to 3 members: none beats greedy's
    best = max(macro_f1_batch(y, combine(probs[list(b)], "mean")[1], 2)
               for n in (1, 2, 3) for b in itertools.combinations_with_replacement(range(2), n))
    assert score == best


def test_greedy_stops_and_keeps_the_shortest_best_prefix():
    y, probs = weighted_case()
    bag, trace = greedy(probs[:1], y, "mean", patience=3)  # one candidate: nothing to gain
    assert bag == [0] and len(trace) == 4  # tried 3 more steps without improvement, kept 1
    bag, trace = greedy(probs, y, "vote", max_size=2)
    assert len(bag) <= 2 and len(trace) <= 2


def test_topk_ranks_by_dev_and_keeps_rank_order_on_ties():
    y = np.array([0, 1, 0, 1])
    probs = two_class([[0.1, 0.9, 0.1, 0.9], [0.9, 0.1, 0.9, 0.1], [0.1, 0.9, 0.1, 0.9]])
    assert topk(probs, y, 2) == [0, 2]


def test_halves_are_disjoint_stratified_and_cover_all_items():
    y = np.repeat(np.arange(6), [40, 25, 13, 12, 8, 3])
    a, b = halves(y, seed=5)
    assert len(np.intersect1d(a, b)) == 0 and sorted(np.r_[a, b]) == list(range(len(y)))
    for c in range(6):
        na, nb = (y[a] == c).sum(), (y[b] == c).sum()
        assert na - nb in (0, 1)


def test_crossfit_scores_each_half_with_members_chosen_on_the_other():
    rng = np.random.default_rng(4)
    y = rng.permutation(np.arange(120) % 6)
    probs = rng.dirichlet(np.ones(6), size=(5, 120))
    probs[:, np.arange(120), y] += rng.uniform(0, 0.25, size=(5, 1))
    seen = []

    def rule(p, yy):
        seen.append(len(yy))
        return topk(p, yy, 2)

    res = crossfit(probs, y, rule, "mean", seed=9)
    a, b = halves(y, 9)
    assert seen == [len(a), len(b)]
    want_b = float(macro_f1_batch(y[b], combine(probs[topk(probs[:, a], y[a], 2)][:, b], "mean")[1], 6))
    want_a = float(macro_f1_batch(y[a], combine(probs[topk(probs[:, b], y[b], 2)][:, a], "mean")[1], 6))
    assert res["halves"] == pytest.approx([want_b, want_a])
    assert res["macro_f1"] == pytest.approx((want_a + want_b) / 2) and 0.3 < res["macro_f1"] < 1


# --------------------------------------------------------------------------------- speed

def test_intervals_for_dozens_of_runs_take_well_under_seconds():
    rng = np.random.default_rng(0)
    n, runs = 480, 48
    y = rng.permutation(np.repeat(np.arange(6), [185, 113, 64, 58, 56, 4]))
    probs = rng.dirichlet(np.ones(6), size=(runs, n))
    pool = Pool("dev", [f"r{i}" for i in range(runs)], ProbTable([str(i) for i in range(n)], y.tolist(), probs[0]),
                probs)
    start = time.perf_counter()
    stats = SplitStats.of(pool, 1000, 0)
    elapsed = time.perf_counter() - start
    assert stats.dists.shape == (runs, 1000)
    assert elapsed < 5.0, f"{elapsed:.2f} s for {runs} runs x 1000 resamples"
