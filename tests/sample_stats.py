"""Standard errors of statistics measured on a sample, for tolerances that shrink with the
sample size instead of fixed ones."""

import numpy as np


def ratio_and_se(num, den) -> tuple[float, float]:
    """sum(num) / sum(den) over per-example values, and its standard error (the delta-method
    variance of a ratio estimator: the sample variance of num - R * den, over m * mean(den)^2),
    estimated from the examples' own spread."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    m = len(num)
    if m < 2:
        raise ValueError(f"need at least 2 examples, got {m}")
    r = num.sum() / den.sum()
    resid = num - r * den
    return float(r), float(np.sqrt(np.sum(resid**2) / (m - 1) / m) / den.mean())


def binomial_se(successes: float, trials: float) -> float:
    """Standard error of the rate successes / trials of independent trials."""
    p = successes / trials
    return float(np.sqrt(p * (1.0 - p) / trials))
