"""Paired comparisons a reviewer accepts: mean ± SE, a paired t-test, the sign count, and a
Holm-Bonferroni correction over every contrast of one table.

Shared by the benchmarks (``compare.py``, ``compare_gpt.py``, ``ladder.py``). A difference is
called **real** only when its paired t-test survives Holm's step-down correction at
``ALPHA`` over the contrasts of the table it appears in (Holm, "A simple sequentially rejective
multiple test procedure", Scand. J. Statist. 1979). With few seeds the t-test is what limits:
3 pairs need |t| > 4.3 before any correction.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from scipy import stats

ALPHA = 0.05


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN SE for a single value)."""
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


@dataclass
class Contrast:
    """Per-pair differences ``a - b``: their mean, SE, the two-sided paired t-test's p-value and
    how many pairs are above / below zero. ``real`` is set by :func:`holm` over a table."""

    mean: float
    se: float
    p: float
    above: int
    below: int
    n: int
    real: bool = False

    @property
    def agree(self) -> float:
        """Fraction of the pairs on the side of the mean."""
        return (self.above if self.mean >= 0 else self.below) / self.n

    def text(self, digits: int = 2) -> str:
        """``+0.36 ± 0.14, p 0.04, 5/5 ≥ 0; real`` as it appears in a table."""
        signs = f"{self.above}+/{self.below}−"
        verdict = "**real**" if self.real else "tie"
        return (f"{self.mean:+.{digits}f} ± {self.se:.{digits}f} (p {format_p(self.p)}, {signs}; "
                f"{verdict})")


def format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def contrast(diffs: list[float]) -> Contrast | None:
    """The contrast of paired differences; None with fewer than two pairs (no test possible)."""
    if len(diffs) < 2:
        return None
    mean, se = mean_se(diffs)
    if se == 0:   # identical differences: the test is degenerate; only "no difference" is exact
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return Contrast(mean, se, p, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), len(diffs))


def paired(a: list[dict], b: list[dict], key: str) -> Contrast | None:
    """``a - b`` of ``key`` over the seeds both lists hold (rows are dicts with a ``seed``)."""
    other = {r["seed"]: r[key] for r in b}
    return contrast([r[key] - other[r["seed"]] for r in a if r["seed"] in other])


def holm(contrasts: list[Contrast | None], alpha: float = ALPHA) -> None:
    """Set ``real`` on each contrast that Holm's step-down procedure rejects at ``alpha``.

    The i-th smallest of m p-values is compared with ``alpha / (m - i)`` (i from 0); the first
    that fails stops the procedure, and it and every larger p-value are ties.
    """
    family = sorted((c for c in contrasts if c is not None), key=lambda c: c.p)
    m = len(family)
    for i, c in enumerate(family):
        c.real = c.p <= alpha / (m - i)
        if not c.real:
            for rest in family[i:]:
                rest.real = False
            return
