"""mmbench.stats on numbers a person can check by hand."""
import math

import pytest

from mmbench import stats


def test_t_interval_by_hand():
    # mean 0.2; s = sqrt((0.01 + 0 + 0.01) / 2) = 0.1; half-width t_{0.975,2}·s/√3 = 4.303·0.1/1.732 = 0.2484
    iv = stats.t_interval([0.1, 0.2, 0.3])
    assert iv.n == 3 and iv.mean == pytest.approx(0.2) and iv.sd == pytest.approx(0.1)
    assert iv.half == pytest.approx(0.2484, abs=1e-4)
    assert (iv.lo, iv.hi) == pytest.approx((0.2 - 0.2484, 0.2 + 0.2484), abs=1e-4)
    assert not iv.excludes(0.0)          # [−0.048, 0.448] contains 0
    assert iv.excludes(-0.1) and iv.excludes(0.5)


def test_t_quantiles_and_fallback_table():
    assert stats.t_quantile(2) == pytest.approx(4.303, abs=1e-3)
    assert stats.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile(9) == pytest.approx(2.262, abs=1e-3)
    for df in (1, 2, 5, 30, 31, 60, 1000):   # the table used without scipy agrees with scipy
        assert stats._t975_fallback(df) == pytest.approx(stats.t_quantile(df), abs=1e-4)


def test_one_value_has_no_interval_and_none_nan_are_dropped():
    iv = stats.t_interval([0.5, None, float("nan")])
    assert iv.n == 1 and iv.mean == 0.5 and math.isnan(iv.half) and not iv.has_interval
    assert not iv.excludes(0.0)
    empty = stats.t_interval([])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_paired_difference_uses_seeds_both_have():
    a = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.9}
    b = {0: 0.40, 1: 0.40, 2: 0.40}               # seed 3 has no partner: left out
    assert stats.paired_values(a, b) == pytest.approx({0: 0.1, 1: 0.2, 2: 0.3})
    iv = stats.paired(a, b)
    assert iv.n == 3 and iv.mean == pytest.approx(0.2) and iv.half == pytest.approx(0.2484, abs=1e-4)


def test_paired_differs_where_unpaired_intervals_overlap():
    # both arms vary a lot across seeds (wide, overlapping intervals), but A is above B by
    # 0.02 ± 0.001 in every seed: the paired interval excludes 0
    a = {0: 0.52, 1: 0.72, 2: 0.92}
    b = {0: 0.50, 1: 0.701, 2: 0.899}
    ia, ib = stats.t_interval(a.values()), stats.t_interval(b.values())
    assert ia.lo < ib.hi and ib.lo < ia.hi       # overlapping
    d = stats.paired(a, b)
    assert d.mean == pytest.approx(0.02) and d.excludes(0.0)


def test_wilson_by_hand():
    # k = 0, n = 10: centre = (z²/2)/(n + z²) = 1.9208/13.8416 = 0.1388 = half-width → (0, 0.2775)
    lo, hi = stats.wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = stats.wilson(10, 10)
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4) and hi == pytest.approx(1.0)
    lo, hi = stats.wilson(5, 10)              # symmetric around 0.5: 0.5 ± 0.2634
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(math.isnan(x) for x in stats.wilson(0, 0))


def test_der_unit_check():
    # ACC 0.9182 → 0.9029 (ΔACC 0.0153), ASR 0.9379 → 0.0170 (ΔASR 0.9209): (0.9209 − 0.0153 + 1)/2
    assert stats.der(0.9182, 0.9029, 0.9379, 0.0170) == pytest.approx(0.9528)
    assert stats.der(0.9, 0.9, 0.5, 0.5) == 0.5          # nothing changes
    assert stats.der(0.8, 0.9, 0.5, 0.7) == 0.5          # gains are clipped at 0
    assert stats.der(0.9, 0.0, 1.0, 1.0) == pytest.approx(0.05)
