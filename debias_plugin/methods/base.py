"""The method contract: what `training.train` calls on a stage (every optional hook has a no-op default), and the
loop's helpers a stage uses too (stream order, compute dtype, train/eval modes), so stages never import the loop."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from debias_plugin.options import Options


class TrainingMethod:
    """A debiasing stage the shared loop runs: subclass, set `name`/`Options`, implement setup/collate/loss.

    Order of calls: `read_inputs()` (before any model loads) -> `setup(run)` -> per step `collate` + `loss`
    (or `update` when `owns_update`) -> `evaluate` at start/end/every eval_every -> `save` -> `report`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]]
    training_defaults: ClassVar[dict[str, Any]] = {}  # shared options whose default differs for this stage
    training_help: ClassVar[dict[str, str]] = {}  # shared options whose help differs for this stage
    unused_training_options: ClassVar[tuple[str, ...]] = ()  # shared options this stage would ignore: refused
    owns_update: ClassVar[bool] = False  # True: `update(run, batch)` replaces loss/backward/optimizer
    uses_optimizer: ClassVar[bool] = True

    def __init__(self, options: Options):
        self.opts = options

    # -- required ---------------------------------------------------------------------------------------
    def setup(self, run) -> list:
        """After the model loads, before it is prepared: returns the training examples (may wrap run.model)."""
        raise NotImplementedError

    def collate(self, examples: list, positions: list[int]) -> dict:
        """One micro-batch of tensors; seed any randomness from the examples' stream positions."""
        raise NotImplementedError

    def loss(self, model, batch: dict):
        """Mean over the micro-batch's examples of per-example losses (unless owns_update)."""
        raise NotImplementedError

    # -- optional ---------------------------------------------------------------------------------------
    def read_inputs(self) -> None:
        """Read and check data files before any model loads, so bad input fails in seconds."""

    def update(self, run, batch: dict) -> float:
        """The whole update step, for methods with owns_update = True; returns the loss to display."""
        raise NotImplementedError(f"{type(self).__name__} sets owns_update but has no update()")

    def sharding_refusal(self) -> str | None:
        """Why this stage cannot run with sharded weights (FSDP), or None when it can (checked before loading)."""
        return None

    def examples_per_step(self, batch_size: int) -> int:
        """Examples consumed by one optimizer step (the stream advances by this)."""
        return batch_size

    def evaluate(self, run) -> dict:
        """Metrics logged at start, end and every eval_every steps (under no_grad, model in eval mode)."""
        return {}

    def save(self, run, folder: Path) -> None:
        run.save_pretrained(run.unwrapped, folder)

    def state_dict(self) -> dict:
        """Extra state to checkpoint (tensors and plain values only: checkpoints hold no pickled objects)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def inputs(self) -> dict[str, str | Path | None]:
        """Data files and folders by role: refused as outputs, hashed into the manifest."""
        return {}

    def options(self) -> dict:
        return self.opts.model_dump(mode="json")

    def report(self) -> dict:
        return {}


def compute_dtype(config):
    """The dtype for frozen copies and held gradients: bf16 when the run (its TrainConfig) computes in bf16, else
    None (the weights')."""
    import torch

    return torch.bfloat16 if "bf16" in (config.precision, config.weights_dtype) else None


class StreamOrder:
    """Position in the training stream -> example index: a seeded permutation per epoch."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self._epochs = size, seed, {}

    def __getitem__(self, position: int) -> int:
        import torch

        epoch, offset = divmod(position, self.size)
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epochs = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._epochs[epoch][offset]


@contextmanager
def modes_kept(model):
    """Restore every module's train/eval flag afterwards (a plain model.train(flag) would lose per-layer modes)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
