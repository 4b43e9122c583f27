"""Negation as a stage like the training ones: pydantic options (its `debias negate` flags, with underscores) and
`make`, so a sweep varies, checks and runs it through the same code as every other stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

from pydantic import ConfigDict, Field, field_validator, model_validator

from debias_plugin.options import InputPath, Options


class NegateOptions(Options):
    """`debias negate`'s options, less the base (the sweep's) and the output (the trial's folder)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    biased: InputPath | None = Field(None, description="The fully fine-tuned biased model (from `debias finetune`).")
    adapter: InputPath | None = Field(None, description="A LoRA adapter of the base instead.")
    lambda_: float = Field(alias="lambda", description="Negation strength: theta = base - lambda * (biased - base); "
                           "0 is the base model itself (with capability: base + mu * capability vector).")
    template: InputPath | None = Field(None, description="A mergekit YAML instead of the bundled one.")
    shard_size: str | int = Field("auto", description="Output shard size (`--max-shard-size`).")
    capability: InputPath | None = Field(None, description="Negate-and-retain: the base fine-tuned on neutral text.")
    mu: float | None = Field(None, description="Weight > 0 of the capability vector (with capability).")

    @field_validator("lambda_", mode="before")
    @classmethod
    def _lambda(cls, value):
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
        return self


class NegateStage:
    """A bias-vector negation of the base through mergekit (debias_plugin.merge.negate)."""

    name: ClassVar[str] = "negate"
    Options: ClassVar[type[NegateOptions]] = NegateOptions

    def __init__(self, options: NegateOptions):
        self.opts = options

    @staticmethod
    def base_settings(fixed: dict) -> dict | None:
        """The setting that leaves the base unchanged: lambda 0, unless a capability vector is added back."""
        return None if fixed.get("capability") else {"lambda": 0.0}

    def make(self, base: Path, out: Path, *, progress: bool = True) -> Path:
        from debias_plugin.merge.negate import negate  # mergekit: imported only when a model is made

        opts = self.opts
        return negate(base, lambdas=[opts.lambda_], out=out, biased=opts.biased, adapter=opts.adapter,
                      template=opts.template, capability=opts.capability, mu=opts.mu, shard_size=opts.shard_size,
                      progress=progress)[0]
