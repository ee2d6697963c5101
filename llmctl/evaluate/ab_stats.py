"""From a served A/B log to a decision: per-variant counts, feedback means with 95% intervals, latency
percentiles, and a test of each variant against the control with the samples still needed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist, fmean, pvariance

Z = NormalDist()


@dataclass(frozen=True)
class VariantStats:
    name: str
    requests: int
    users: int
    scores: list[float]  # the latest score of each rated completion
    latencies: list[float]
    first_token: list[float]
    completion_tokens: int

    @property
    def feedback_rate(self) -> float:
        return len(self.scores) / self.requests if self.requests else 0.0

    @property
    def binary(self) -> bool:
        return all(score in (0.0, 1.0) for score in self.scores)

    @property
    def mean(self) -> float | None:
        return fmean(self.scores) if self.scores else None

    def interval(self, confidence: float = 0.95) -> tuple[float, float] | None:
        """Wilson's interval for thumbs (right near 0 and 1), the normal one for graded scores."""
        n = len(self.scores)
        if n == 0:
            return None
        z = Z.inv_cdf(0.5 + confidence / 2)
        mean = fmean(self.scores)
        if self.binary:
            centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
            half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
            return centre - half, centre + half
        half = z * math.sqrt(pvariance(self.scores) / n) if n > 1 else math.inf
        return mean - half, mean + half


@dataclass(frozen=True)
class Comparison:
    control: str
    variant: str
    difference: float  # variant mean - control mean
    p_value: float
    test: str
    more_per_variant: int | None  # rated completions each still needs for 80% power, if not yet significant
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    def verdict(self) -> str:
        if self.significant:
            word = "better" if self.difference > 0 else "worse"
            return (
                f"{self.variant} is {word} than {self.control}: {self.difference:+.3f} in mean score "
                f"(p = {self.p_value:.2g}, {self.test})"
            )
        if self.more_per_variant is None:
            return f"no difference between {self.variant} and {self.control} yet, and none observed to size a test by"
        if self.more_per_variant == 0:
            return (
                f"no difference between {self.variant} and {self.control} (p = {self.p_value:.2g}): the "
                f"observed {self.difference:+.3f} is within the noise of this many ratings"
            )
        return (
            f"no difference yet between {self.variant} and {self.control} (p = {self.p_value:.2g}); at the "
            f"observed {self.difference:+.3f}, about {self.more_per_variant:,} more rated completions per variant "
            f"would decide it (80% power, alpha {self.alpha})"
        )


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def variant_stats(records: list[dict]) -> dict[str, VariantStats]:
    """Per variant, from a log's records; a completion rated twice counts its latest score."""
    completions = [r for r in records if r.get("event") == "completion"]
    scores: dict[str, float] = {}
    for record in records:
        if record.get("event") == "feedback" and isinstance(record.get("score"), int | float):
            scores[str(record.get("id"))] = float(record["score"])
    stats = {}
    for name in sorted({str(r.get("variant")) for r in completions}):
        own = [r for r in completions if str(r.get("variant")) == name]
        stats[name] = VariantStats(
            name=name,
            requests=len(own),
            users=len({r["user"] for r in own if r.get("user")}),
            scores=[scores[r["id"]] for r in own if r.get("id") in scores],
            latencies=[
                float(r["latency_seconds"]) for r in own if isinstance(r.get("latency_seconds"), int | float)
            ],
            first_token=[
                float(r["first_token_seconds"])
                for r in own
                if isinstance(r.get("first_token_seconds"), int | float)
            ],
            completion_tokens=sum(int(r.get("completion_tokens") or 0) for r in own),
        )
    return stats


def compare(
    control: VariantStats, variant: VariantStats, alpha: float = 0.05, power: float = 0.8
) -> Comparison:
    """Two-proportion z-test for thumbs, Welch's z-test for graded scores (both large-sample); the samples
    still needed come from the usual normal-approximation power formula at the observed difference."""
    a, b = control.scores, variant.scores
    if not a or not b:
        return Comparison(control.name, variant.name, math.nan, 1.0, "no feedback yet", None, alpha)
    mean_a, mean_b = fmean(a), fmean(b)
    difference = mean_b - mean_a
    if control.binary and variant.binary:
        test = "two-proportion z-test"
        pooled = (sum(a) + sum(b)) / (len(a) + len(b))
        spread = math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
        var_a, var_b = mean_a * (1 - mean_a), mean_b * (1 - mean_b)
    else:
        test = "Welch z-test"
        var_a, var_b = pvariance(a), pvariance(b)
        spread = math.sqrt(var_a / len(a) + var_b / len(b))
    z = abs(difference) / spread if spread else (0.0 if difference == 0 else math.inf)
    p_value = 2 * (1 - Z.cdf(z))
    more = None
    if p_value >= alpha and difference != 0:
        needed = (Z.inv_cdf(1 - alpha / 2) + Z.inv_cdf(power)) ** 2 * (var_a + var_b) / difference**2
        more = max(0, math.ceil(needed) - min(len(a), len(b)))
    return Comparison(control.name, variant.name, difference, p_value, test, more, alpha)
