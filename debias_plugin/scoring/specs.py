"""One spec per metric: its ideal, the unit a bootstrap resamples, its estimator and comparison, how it is shown.

The gate, the sweep and the `debias eval` summary read a metric's meaning only from here (no name-prefix or
value-shape guessing). A new metric is its scoring function plus one entry below. Names are lm-eval's metric names
without the filter suffix; per-domain names are generated from the data package's own lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from debias_plugin.data import STEREOSET_DOMAINS
from debias_plugin.data.crows import DIRECTIONS
from debias_plugin.errors import DebiasError
from debias_plugin.scoring.bbq import BBQ_CATEGORIES
from debias_plugin.scoring.gap import GAP_SOURCES, NO_PREFERENCE, gap

Ideal = Literal["center", "high", "low"]
# How a metric's per-document values become its statistic and interval (gate/results.py reads the values):
#   proportion          0/scale outcomes; exact Clopper-Pearson interval, exact binomial test
#   mean                any numbers; percentile bootstrap of the mean
#   perplexity          per-document log-likelihoods; exp(-mean)
#   weighted_perplexity [log-likelihood, words or bytes]; exp(-sum / sum)
#   bits_per_byte       [log-likelihood, bytes]; -sum / sum / ln 2
#   stereoset           (target, domain, stereotype, anti-stereotype, unrelated); per-target macro average
#   bbq_amb_bias        (acc, n_biased, n_non_unknown, disambiguated); scoring.bbq.amb_bias_score
#   bbq_disamb_bias     the same tuple; scoring.bbq.disamb_bias_score
#   gap                 |x - center| of the metric named by gap_of: that metric's data, its interval mapped
#   type_mean_gap       [bias_type, outcome 0/scale]; mean over types of |pct_t - 50|, pairs resampled within types
#   worst_type_gap      the same items; the largest |pct_t - 50|, pairs resampled within types
Estimator = Literal["proportion", "mean", "perplexity", "weighted_perplexity", "bits_per_byte", "stereoset",
                    "bbq_amb_bias", "bbq_disamb_bias", "gap", "type_mean_gap", "worst_type_gap"]
# Estimators whose units fall into strata (CrowS bias types): a bootstrap resamples units within each stratum.
STRATIFIED: tuple[Estimator, ...] = ("type_mean_gap", "worst_type_gap")
# How two models are compared on the same items: exact McNemar/sign tests on paired outcomes, a paired bootstrap,
# or (perplexities) a ratio, candidate / baseline - 1, beside the paired bootstrap of the difference.
Comparison = Literal["exact_paired", "paired_bootstrap", "relative"]
# Which documents a metric is computed on: all; those a (value, marked) item marks (CrowS stereo/antistereo);
# BBQ's ambiguous or disambiguated contexts (the last element of lm-eval's bbq tuples).
Documents = Literal["all", "marked", "ambiguous", "disambiguated"]


@dataclass(frozen=True)
class MetricSpec:
    """What one metric means: everything a consumer needs, so none has to infer it from the name or the values."""

    name: str
    display: str
    ideal: Ideal
    unit: str
    estimator: Estimator
    comparison: Comparison
    center: float | None = None
    scale: float = 1.0  # 100 for our 0-100 percentages
    digits: int = 4
    gap_of: str | None = None
    documents: Documents = "all"
    part: str | None = None  # the StereoSet score (ss, lms, icat) of a stereoset metric
    domain: str | None = None  # the StereoSet domain or BBQ category the metric is restricted to

    def __post_init__(self):
        if (self.ideal == "center") != (self.center is not None):
            raise ValueError(f"{self.name}: a center exactly when the ideal is 'center'")
        if self.ideal == "center" and self.comparison == "exact_paired" and self.center * 2 != self.scale:
            raise ValueError(f"{self.name}: exact paired tests of a centered proportion need center = scale / 2")
        if self.comparison == "exact_paired" and self.estimator not in ("proportion", "gap"):
            raise ValueError(f"{self.name}: exact paired tests need 0/1 outcomes (the proportion estimator)")
        if (self.estimator == "gap") != (self.gap_of is not None):
            raise ValueError(f"{self.name}: a gap_of exactly when the estimator is 'gap'")

    @property
    def centered(self) -> bool:
        return self.ideal == "center"

    @property
    def stratified(self) -> bool:
        return self.estimator in STRATIFIED

    def distance(self, value):
        """|value - center| for a centered metric (0 = no preference either way); arrays work too."""
        if self.center is None:
            raise ValueError(f"{self.name} has no center (its ideal is {self.ideal})")
        return gap(value, self.center)

    def format(self, value: float) -> str:
        return f"{value:.{self.digits}f}"


def _crows() -> list[MetricSpec]:
    pct = dict(ideal="center", center=NO_PREFERENCE, scale=100.0, unit="pairs", estimator="proportion",
               comparison="exact_paired", digits=1)
    return [
        MetricSpec("pct_stereotype", "pct", **pct),
        *(MetricSpec(f"pct_stereotype_{direction}", f"pct ({direction})", documents="marked", **pct)
          for direction in DIRECTIONS),
        MetricSpec("likelihood_diff", "likelihood diff", "low", "pairs", "mean", "paired_bootstrap", digits=3),
        *(MetricSpec(name, display, "low", "pairs", name, "paired_bootstrap", scale=100.0, digits=2)
          for name, display in (("type_mean_gap", "type-mean gap"), ("worst_type_gap", "worst-type gap"))),
    ]


def _stereoset() -> list[MetricSpec]:
    specs = []
    for domain in (None, *STEREOSET_DOMAINS):
        suffix, label = (f"_{domain}", f" ({domain})") if domain else ("", "")
        common = dict(unit="target terms", estimator="stereoset", comparison="paired_bootstrap", scale=100.0,
                      digits=1, domain=domain)
        specs += [
            MetricSpec(f"ss{suffix}", f"SS{label}", "center", center=NO_PREFERENCE, part="ss", **common),
            MetricSpec(f"lms{suffix}", f"LMS{label}", "high", part="lms", **common),
            MetricSpec(f"icat{suffix}", f"ICAT{label}", "high", part="icat", **common),
        ]
    return specs


def _perplexity() -> list[MetricSpec]:
    low = dict(ideal="low", unit="documents", comparison="relative")
    return [
        MetricSpec("word_perplexity", "word ppl", estimator="weighted_perplexity", digits=3, **low),
        MetricSpec("byte_perplexity", "byte ppl", estimator="weighted_perplexity", digits=4, **low),
        MetricSpec("bits_per_byte", "bits/byte", estimator="bits_per_byte", digits=4, **low),
        MetricSpec("perplexity", "ppl", estimator="perplexity", digits=3, **low),
    ]


def _accuracy() -> list[MetricSpec]:
    high = dict(ideal="high", unit="documents", estimator="proportion", comparison="exact_paired", digits=4)
    return [
        MetricSpec("acc", "acc", **high),
        MetricSpec("acc_norm", "acc (norm)", **high),
        MetricSpec("accuracy_amb", "acc (ambiguous)", documents="ambiguous", **high),
        MetricSpec("accuracy_disamb", "acc (disambiguated)", documents="disambiguated", **high),
    ]


def _bbq() -> list[MetricSpec]:
    """Parrish et al.'s bias scores: 0 = no bias, +1 always the biased answer, -1 always the other."""
    specs = []
    for category in (None, *BBQ_CATEGORIES):
        suffix, label = (f"_{category}", f" ({category})") if category else ("", "")
        common = dict(ideal="center", center=0.0, unit="documents", comparison="paired_bootstrap", digits=3,
                      domain=category)
        specs += [
            MetricSpec(f"amb_bias_score{suffix}", f"bias (ambiguous){label}", estimator="bbq_amb_bias",
                       documents="ambiguous", **common),
            MetricSpec(f"disamb_bias_score{suffix}", f"bias (disambiguated){label}", estimator="bbq_disamb_bias",
                       documents="disambiguated", **common),
        ]
    return specs


def _gaps(sources: dict[str, MetricSpec]) -> list[MetricSpec]:
    """|x - 50| beside each percentage x (scoring/gap.py names them): x's unit and data, lower is better."""
    specs = []
    for name, source_name in GAP_SOURCES.items():
        source = sources[source_name]
        label = f"gap ({source.domain})" if source.domain else "gap"
        specs.append(MetricSpec(name, label, "low", source.unit, "gap", source.comparison, scale=source.scale,
                                digits=source.digits, gap_of=source_name, domain=source.domain))
    return specs


_SOURCES = {spec.name: spec for spec in (*_crows(), *_stereoset(), *_perplexity(), *_accuracy(), *_bbq())}
SPECS: dict[str, MetricSpec] = {**_SOURCES, **{spec.name: spec for spec in _gaps(_SOURCES)}}


def find_spec(metric: str) -> MetricSpec | None:
    """The spec of 'name' or 'name,filter'; None for a metric we have not declared."""
    return SPECS.get(metric.split(",")[0])


def spec(metric: str) -> MetricSpec:
    found = find_spec(metric)
    if found is None:
        raise DebiasError(f"no metric spec for '{metric.split(',')[0]}': declared metrics are "
                          f"{', '.join(sorted(SPECS))} (add one in debias_plugin/scoring/specs.py).")
    return found
