"""Known answers for the benchmark's paired bootstrap intervals (`difference_intervals`), on hand-made per-function
outputs instead of logged runs: where the difference is the same on every function the interval is that point,
and where the models differ on one function of n the interval is the binomial one, computable by hand."""

import numpy as np
import pytest

from moekd_ray.recipes import benchmark

N = 20
LABELS = np.arange(N) % 2
RIGHT = np.where(LABELS == 1, 0.9, 0.1)  # P(vulnerable) that classifies every function correctly


def intervals(monkeypatch, outputs: dict, attacks=(), resamples=4000, seed=0) -> dict:
    """{(against, metric): (difference, low, high)} for runs whose logged outputs are `outputs[method]`."""
    monkeypatch.setattr(benchmark, "logged_outputs", lambda run_id, attacks: outputs[run_id])
    rows = [{"method": m, "run_ids": m} for m in outputs]
    got = benchmark.difference_intervals(rows, LABELS, list(attacks), resamples, seed)
    return {(d["against"], d["metric"]): (d["difference"], d["low"], d["high"]) for d in got}


def test_same_outputs_give_zero_with_a_zero_interval(monkeypatch):
    """Paired: each resample draws the same functions for both models, so equal outputs (wrong on a quarter of
    the functions, so a resample's accuracy varies) differ by exactly 0 in every resample."""
    some_wrong = RIGHT.copy()
    some_wrong[:5] = 1 - RIGHT[:5]
    out = intervals(monkeypatch, {"moekd": (some_wrong, {}), "compressor": (some_wrong, {})})
    assert out == {("compressor", "test_accuracy"): (0, 0, 0), ("compressor", "test_f1"): (0, 0, 0)}


def test_right_everywhere_against_wrong_everywhere(monkeypatch):
    success = {"status": ["success"] * 6 + ["skipped"] * 2}
    failed = {"status": ["failed"] * 6 + ["skipped"] * 2}
    out = intervals(monkeypatch, {"moekd": (RIGHT, {"mhm": success}), "compressor": (1 - RIGHT, {"mhm": failed})},
                    attacks=["mhm"])
    # accuracy 1 vs 0, F1 1 vs 0 (no true positive), ASR 6/6 vs 0/6 (skipped examples are not attempts)
    assert out == {("compressor", "test_accuracy"): (1, 1, 1), ("compressor", "test_f1"): (1, 1, 1),
                   ("compressor", "asr_mhm"): (1, 1, 1)}


def test_one_function_of_n_gives_the_binomial_interval(monkeypatch):
    """The compressor is wrong on function 0 only: the accuracy difference is 1/N, and in a resample it is
    k/N with k ~ Binomial(N, 1/N) (how often function 0 is drawn): P(k=0) = 0.358 > 2.5%, so the low end is 0;
    P(k<=2) = 0.925 and P(k<=3) = 0.984 straddle 97.5%, so the high end is 3/N. Against an avatar wrong on the
    same function and on function 1 too, the difference is 2/N."""
    from scipy.stats import binom

    assert binom.cdf(0, N, 1 / N) > 0.025 and binom.cdf(2, N, 1 / N) < 0.975 < binom.cdf(3, N, 1 / N)
    one_wrong, two_wrong = RIGHT.copy(), RIGHT.copy()
    one_wrong[0] = two_wrong[0] = 1 - RIGHT[0]
    two_wrong[1] = 1 - RIGHT[1]
    out = intervals(monkeypatch, {"moekd": (RIGHT, {}), "compressor": (one_wrong, {}), "avatar": (two_wrong, {})})
    diff, low, high = out["compressor", "test_accuracy"]
    assert diff == pytest.approx(1 / N) and low == 0 and high == pytest.approx(3 / N)
    # Two of N: k ~ Binomial(N, 2/N); its 97.5% quantile, by hand from the cdf.
    k975 = next(k for k in range(N) if binom.cdf(k, N, 2 / N) >= 0.975)
    diff, low, high = out["avatar", "test_accuracy"]
    assert diff == pytest.approx(2 / N) and low == 0 and high == pytest.approx(k975 / N)
    # The same seed gives the same intervals again.
    assert intervals(monkeypatch, {"moekd": (RIGHT, {}), "compressor": (one_wrong, {})}, seed=0) == \
        {k: v for k, v in out.items() if k[0] == "compressor"}
