"""The statistics of the leaderboard and the findings (docs/statistics.md states the policy).

- :func:`t_interval`: mean ± 95 % t-interval over seeds, x̄ ± t_{0.975, n−1}·s/√n with the
  sample standard deviation s (n − 1 in the denominator); n = 1 gives no interval.
- :func:`paired`: the paired difference of two measurements per seed, d_i = a_i − b_i, and
  the t-interval of the d_i. Two things are said to differ only when that interval
  excludes 0 (:meth:`Interval.excludes`), never by comparing two unpaired intervals.
- :func:`wilson`: the Wilson score interval (z = 1.96) of a binomial proportion k / n, for
  ASR and single-task ACC within one cell.
- :func:`der`: the defense effectiveness rating of BackdoorBench / FT-SAM (eq. 7).

Values are fractions (0.93, not 93 %). NaN and None are dropped before anything is computed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

Z95 = 1.96  # the policy's z for Wilson intervals

# t_{0.975, df} for df = 1..30, used only when scipy is not importable (scipy comes with
# scikit-learn, a dependency of mmbench, so this is a fallback)
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)


def _t975_fallback(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    # Cornish-Fisher expansion around the normal quantile (error < 1e-5 for df > 30)
    z = 1.959963984540054
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


@functools.lru_cache(maxsize=None)
def t_quantile(df: int) -> float:
    """t_{0.975, df}: the two-sided 95 % quantile of Student's t with ``df`` degrees of freedom
    (remembered per ``df``: a leaderboard asks for a few values some 8,000 times)."""
    if df < 1:
        raise ValueError(f"a t quantile needs df ≥ 1, not {df}")
    try:
        from scipy.stats import t
    except ImportError:  # pragma: no cover - scipy is installed with scikit-learn
        return _t975_fallback(df)
    return float(t.ppf(0.975, df))


def clean(values: Iterable[float | None]) -> list[float]:
    """The finite values among ``values`` (None and NaN dropped)."""
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if not math.isnan(v):
            out.append(v)
    return out


@dataclass(frozen=True)
class Interval:
    """Mean ± 95 % t-interval of ``n`` values; ``lo``/``hi``/``half``/``sd`` are NaN when n < 2
    (and ``mean`` too when n = 0)."""
    n: int
    mean: float
    sd: float
    half: float

    @property
    def lo(self) -> float:
        return self.mean - self.half

    @property
    def hi(self) -> float:
        return self.mean + self.half

    @property
    def has_interval(self) -> bool:
        return self.n >= 2

    def excludes(self, value: float = 0.0) -> bool:
        """Whether the interval lies entirely on one side of ``value`` (False without an interval)."""
        return self.has_interval and (self.lo > value or self.hi < value)


def t_interval(values: Iterable[float | None]) -> Interval:
    """x̄ ± t_{0.975, n−1}·s/√n of the finite ``values`` (s with n − 1)."""
    xs = clean(values)
    n = len(xs)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan)
    mean = math.fsum(xs) / n
    if n == 1:
        return Interval(1, mean, math.nan, math.nan)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(n, mean, sd, t_quantile(n - 1) * sd / math.sqrt(n))


def paired_values(a: Mapping, b: Mapping) -> dict:
    """d_i = a_i − b_i for every key (seed) where both are finite, in key order."""
    out = {}
    for key in sorted(set(a) & set(b)):
        x, y = clean([a[key]]), clean([b[key]])
        if x and y:
            out[key] = x[0] - y[0]
    return out


def paired(a: Mapping, b: Mapping) -> Interval:
    """The paired difference a − b over the seeds (keys) both have: d̄ ± t·s_d/√n."""
    return t_interval(paired_values(a, b).values())


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (z = 1.96: 95 %); (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, n={n}]")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact at the ends (k = 0: lo = 0, k = n: hi = 1), where rounding would leave the estimate outside
    lo = 0.0 if k == 0 else min(p, max(0.0, centre - half))
    hi = 1.0 if k == n else max(p, min(1.0, centre + half))
    return lo, hi


def der(acc_before: float, acc_after: float, asr_before: float, asr_after: float) -> float:
    """DER = [max(0, ΔASR) − max(0, ΔACC) + 1] / 2 with ΔASR = ASR_before − ASR_after and
    ΔACC = ACC_before − ACC_after (fractions): 1 removes the backdoor at no ACC cost,
    0.5 changes nothing, 0 costs all ACC and removes nothing."""
    d_asr = asr_before - asr_after
    d_acc = acc_before - acc_after
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1) / 2
