"""Negative preference optimisation (Zhang et al. 2024) as the forget loss of masked-token unlearning.

Gradient ascent on log p(targets) diverges: nothing bounds it, so perplexity collapses once the targets are
gone. NPO treats the forget targets as dispreferred answers against the original model:
loss = (2 / beta) * softplus(beta * (log p_theta(y|x) - log p_ref(y|x))), with y the target tokens of a text.
Its gradient is gradient ascent's, weighted by sigmoid(beta * log-ratio), which fades as the model moves away
from the reference; at the start (theta = ref) the two gradients are equal. Retain regularisers as in unlearn.
"""

from __future__ import annotations

from pydantic import Field, FiniteFloat

from debias_plugin.methods import label_logprobs
from debias_plugin.methods.unlearn import Unlearn, UnlearnOptions


class NPOOptions(UnlearnOptions):
    beta: FiniteFloat = Field(0.1, gt=0, description="Inverse temperature: larger stops the ascent sooner.")


class NPO(Unlearn):
    """Unlearn chosen tokens with negative preference optimisation (bounded, unlike gradient ascent).

    Same targets, corpora, regularisers and LoRA options as `debias unlearn`; the forget loss is NPO's against
    the original model (a frozen copy, or under LoRA the model with its adapter disabled).
    """

    name = "npo"
    Options = NPOOptions

    def needs_reference(self) -> bool:
        return True

    def forget_loss(self, model, batch: dict):
        import torch

        targets = batch["targets"].to(torch.float32)
        current = (label_logprobs(model, self.kind, batch) * targets).sum(-1)
        with self.original_model() as reference:
            original = (label_logprobs(reference, self.kind, batch) * targets).sum(-1)
        beta = self.opts.beta
        return (2 / beta) * torch.nn.functional.softplus(beta * (current - original)).mean()
