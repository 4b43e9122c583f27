"""Negation as a stage like the training ones: pydantic options (its `debias negate` flags, with underscores) and
`make`, so a sweep varies, checks and runs it through the same code as every other stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from debias_plugin.options import InputPath, MadeStage, Options


LAMBDAS = ("lambda_", "lambda_2", "lambda_3", "lambda_4", "lambda_5", "lambda_6")  # one per source, sweep knobs


class NegateOptions(Options):
    """`debias negate`'s options, less the base (the sweep's) and the output (the trial's folder)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    biased: InputPath | list[InputPath] | None = Field(
        None, description="The fully fine-tuned biased model (from `debias finetune`), or a list of several: "
                          "theta = base - lambda * tau_1 - lambda_2 * tau_2 - ...")
    adapter: InputPath | list[InputPath] | None = Field(None, description="A LoRA adapter of the base instead "
                                                                          "(or a list).")
    lambda_: float = Field(alias="lambda", description="Negation strength: theta = base - lambda * (biased - base); "
                           "0 is the base model itself (with capability: base + mu * capability vector).")
    lambda_2: float | None = Field(None, description="Strength of the second source of a list (each is a knob).")
    lambda_3: float | None = Field(None, description="Strength of the third source.")
    lambda_4: float | None = Field(None, description="Strength of the fourth source.")
    lambda_5: float | None = Field(None, description="Strength of the fifth source.")
    lambda_6: float | None = Field(None, description="Strength of the sixth source.")
    method: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="ties: mergekit's TIES over the scaled vectors (merge_configs/negate_ties.yml).")
    template: InputPath | None = Field(None, description="A mergekit YAML instead of the bundled one.")
    shard_size: str | int = Field("auto", description="Output shard size (`--max-shard-size`).")
    capability: InputPath | None = Field(None, description="Negate-and-retain: the base fine-tuned on neutral text.")
    mu: float | None = Field(None, description="Weight > 0 of the capability vector (with capability).")

    @field_validator("lambda_", "lambda_2", "lambda_3", "lambda_4", "lambda_5", "lambda_6", mode="before")
    @classmethod
    def _lambda(cls, value, info):
        if value is None and info.field_name != "lambda_":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError("lambda must be a number >= 0 (0 is the base model)")
        return value

    @field_validator("mu")
    @classmethod
    def _mu(cls, value):
        from debias_plugin.errors import DebiasError
        from debias_plugin.merge.config import parse_lambda

        try:
            return None if value is None else parse_lambda(value, "mu")
        except DebiasError as err:
            raise ValueError(str(err).rstrip(".")) from None

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value):
        from debias_plugin.errors import DebiasError
        from debias_plugin.merge.config import parse_size

        try:
            parse_size(value)
        except DebiasError as err:
            raise ValueError(str(err).rstrip(".")) from None
        return value

    @model_validator(mode="after")
    def _sources(self):
        if (self.capability is None) != (self.mu is None):
            raise ValueError("negate-and-retain needs both capability (a model fine-tuned on neutral text) and mu "
                             "(its weight > 0)")
        given = [key for key in ("biased", "adapter") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("negate needs exactly one of biased (a fine-tuned model folder) and adapter (a LoRA "
                             f"adapter) (found {', '.join(given) or 'none'})")
        count = len(self.sources)
        if not 1 <= count <= len(LAMBDAS):
            raise ValueError(f"{given[0]} lists {count} sources; negate takes 1 to {len(LAMBDAS)}")
        wanted, found = list(LAMBDAS[1:count]), [name for name in LAMBDAS[1:] if getattr(self, name) is not None]
        if found != wanted:
            raise ValueError(f"{count} {given[0]} source(s) need one lambda each: "
                             f"{', '.join(['lambda', *wanted])} (found {', '.join(['lambda', *found])})")
        return self

    @property
    def sources(self) -> list[str]:
        given = self.biased if self.biased is not None else self.adapter
        return list(given) if isinstance(given, list) else [given]

    @property
    def lambdas(self) -> list[float]:
        """One lambda per source, in order: lambda, lambda_2, ..."""
        return [self.lambda_ if name == "lambda_" else getattr(self, name) for name in LAMBDAS[:len(self.sources)]]


class NegateStage(MadeStage):
    """A bias-vector negation of the base through mergekit (debias_plugin.merge.negate)."""

    name: ClassVar[str] = "negate"
    Options: ClassVar[type[NegateOptions]] = NegateOptions

    @staticmethod
    def base_settings(fixed: dict) -> dict | None:
        """The setting that leaves the base unchanged: every lambda 0, unless a capability vector is added back."""
        if fixed.get("capability"):
            return None
        given = fixed.get("biased", fixed.get("adapter"))
        count = len(given) if isinstance(given, list) else 1
        return {"lambda": 0.0, **{f"lambda_{k}": 0.0 for k in range(2, count + 1)}}

    def make(self, base: Path, out: Path, *, progress: bool = True) -> Path:
        from debias_plugin.errors import DebiasError
        from debias_plugin.merge.negate import negate  # mergekit: imported only when a model is made

        opts = self.opts
        kept = [(source, lam) for source, lam in zip(opts.sources, opts.lambdas) if lam > 0]  # lambda 0: left out
        if len(opts.sources) > 1 and not kept:
            raise DebiasError("negate: every lambda is 0, which is the base model itself.")
        kept = kept if len(opts.sources) > 1 else list(zip(opts.sources, opts.lambdas))
        sources = [source for source, _ in kept]
        sources = sources[0] if len(sources) == 1 else sources
        role = "biased" if opts.biased is not None else "adapter"
        return negate(base, lambdas=[lam for _, lam in kept], out=out, **{role: sources}, method=opts.method,
                      template=opts.template, capability=opts.capability, mu=opts.mu, shard_size=opts.shard_size,
                      progress=progress)[0]
