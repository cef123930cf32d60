"""Statistics of the report: the metrics' names and direction, Student-t / Welch / paired intervals, verdicts
and power.

Pure functions of numbers (scipy, pandas); no files, no params.
"""

import pandas as pd
from scipy import stats as st

# Display names of the metrics (tables, plot axes).
METRIC_LABELS = {
    "fid": "FID",
    "fdd": "FDD",
    "fcd": "FCD",
    "is": "IS",
    "fd_classifier": "FD_clf",
    "is_classifier": "IS_clf",
}


def lower_is_better(metric):
    """Fréchet distances (fid, fdd, fcd, fd_classifier): lower is better; Inception Scores (is*): higher."""
    return not metric.startswith("is")


def best_index(values, metric):
    """Index label of the best of `values` (a Series of one metric): the lowest, or the highest for a score."""
    return values.idxmin() if lower_is_better(metric) else values.idxmax()


def t_interval(values, level=0.95):
    """(mean, half-width) of the Student-t interval over independent runs; half-width NaN for n < 2."""
    x = pd.Series(values, dtype=float)
    n = len(x)
    if n < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(st.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / n**0.5)


def welch_interval(a, b, level=0.95):
    """(mean(a) − mean(b), half-width) with Welch's t-interval (unequal variances)."""
    a, b = pd.Series(a, dtype=float), pd.Series(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float(a.mean() - b.mean()), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
    return float(a.mean() - b.mean()), float(st.t.ppf(0.5 + level / 2, dof) * (va + vb) ** 0.5)


def paired_interval(a, b, level=0.95):
    """(mean(a − b), half-width): the t-interval of per-seed differences; a, b indexed by the same seeds."""
    return t_interval((pd.Series(a, dtype=float) - pd.Series(b, dtype=float)).dropna(), level)


def verdict_of(diff, half, a, b, lower_better=True):
    """ "not separable" when the interval diff ± half contains 0, else which of a, b is better."""
    if pd.isna(half) or abs(diff) <= half:
        return "not separable"
    return f"{a if (diff < 0) == lower_better else b} better"


def detectable_difference(sd, n, level=0.95, power=0.8):
    """Smallest true paired difference a two-sided paired t-test at `level` detects with probability
    `power` over n seeds with per-seed difference SD sd: (t_{(1+level)/2, n−1} + t_{power, n−1}) · sd / √n."""
    if n < 2 or pd.isna(sd):
        return float("nan")
    return float((st.t.ppf(0.5 + level / 2, n - 1) + st.t.ppf(power, n - 1)) * sd / n**0.5)
