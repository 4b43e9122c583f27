"""The training loop every debiasing stage shares: load, accelerate, accumulate, checkpoint, resume, save.

A stage is a `debias_plugin.methods.base.TrainingMethod` (its hooks and their order are documented there);
`train(config, method)` runs it under the shared `TrainConfig`.

The global stream of examples is a fresh seeded permutation per epoch; step ``s`` uses stream positions
``[s*B, (s+1)*B)`` with ``B`` the method's examples per step. That makes resuming a matter of restoring the step
counter, and makes 1 and N processes see the same global batch. Many processes: ``accelerate launch --multi_gpu
--num_processes N debias ...`` (on a CPU-only machine too: the core then runs gloo DDP; accelerate's own
``--cpu`` launcher starts a single process unless mpirun is configured), or ``torchrun --nproc_per_node N``.
Checkpoints (every ``checkpoint_every`` steps) hold the weights (safetensors), optimizer, scheduler, per-process
RNG states, history and method state, in ``<output>.checkpoints/``; a rerun with the same options resumes from
the latest one. The final folder is published through `outputs.OutputFolder`.

Test hook: the environment variable ``DEBIAS_ABORT_AFTER_STEP=k`` makes every process SIGKILL itself right
after step k (after any checkpoint of that step), to test resume after a real kill.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FiniteFloat, model_validator

from debias_plugin.errors import DebiasError
from debias_plugin.methods.base import TrainingMethod
from debias_plugin.options import Options
from debias_plugin.outputs import MANIFEST_NAME, OutputFolder, manifest  # noqa: F401  (MANIFEST_NAME: API)

logger = logging.getLogger(__name__)

ABORT_ENV = "DEBIAS_ABORT_AFTER_STEP"
_PRECISIONS = {"fp32": "no", "bf16": "bf16"}
# transformers schedulers that need nothing beyond warmup and total steps
Scheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                    "inverse_sqrt"]


class TrainConfig(Options):
    """Options every stage shares (defaults are Lu et al.'s); all go into the manifest and the resume fingerprint."""

    model: str = Field(description="Hugging Face model folder.")
    output: str = Field(description="Folder to write.")
    steps: int = Field(50, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Examples per optimizer step, over all processes and "
                                                 "accumulation micro-steps.")
    grad_accum: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    lr: FiniteFloat = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: FiniteFloat = Field(0.0, ge=0)
    scheduler: Scheduler = Field("constant", description="transformers learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: FiniteFloat = Field(0.0, ge=0, description="0 = no clipping.")
    max_length: int = Field(128, ge=2, description="Tokens per text (truncated).")
    seed: int = Field(0, ge=0)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: mixed precision through accelerate.")
    dropout: bool = Field(True, description="--no-dropout trains in eval mode (identical results for any "
                                            "process count).")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps in "
                                                       "OUTPUT.checkpoints/ (0 = never).")
    eval_every: int = Field(0, ge=0, description="Log evaluation metrics every N steps.")
    snapshot_steps: list[int] = Field([], description="Also write a model folder at these steps (comma-separated), "
                                                      "to OUTPUT.snapshots/step-N/, kept after the run.",
                                      json_schema_extra={"separator": ","})
    force: bool = Field(False, description="Replace a non-empty output folder.")
    keep_checkpoints: bool = Field(False, description="Keep OUTPUT.checkpoints/ after success.")
    allow_pickle: bool = Field(False, description="Allow loading pickle (.bin) weights you trust.")
    trust_remote_code: bool = Field(False, description="Run the model folder's own code (unsafe).")

    @model_validator(mode="after")
    def _snapshots_within_the_run(self):
        outside = [step for step in self.snapshot_steps if not 1 <= step <= self.steps]
        if outside:
            raise ValueError(f"snapshot_steps {outside} are outside the run's steps 1..{self.steps}")
        return self


@dataclass
class Run:
    """Everything a method may need while training: options, model, tokenizer, accelerator."""

    config: TrainConfig
    model: Any
    tokenizer: Any
    kind: str
    accelerator: Any = None
    optimizer: Any = None
    scheduler: Any = None
    step: int = 0

    @property
    def device(self):
        return self.accelerator.device

    @property
    def unwrapped(self):
        """The bare model (no DDP wrapper), for evaluation, saving and method-owned updates."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


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


def _rng_state() -> dict:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs one method under one config: the loop, its checkpoints and the atomic final save."""

    def __init__(self, config: TrainConfig, method: TrainingMethod):
        self.config, self.method = config, method
        self._refuse_unused_options()
        self.folder = OutputFolder(config.output, inputs=[config.model, *method.inputs().values()],
                                   force=config.force)
        self.output = self.folder.path
        self.checkpoints = self.output.parent / f"{self.output.name}.checkpoints"
        self.snapshots = self.output.parent / f"{self.output.name}.snapshots"
        self.per_step = method.examples_per_step(config.batch_size)
        self.history: list[dict] = []
        self.losses: list[float] = []

    # -- setup --------------------------------------------------------------------------------------------
    def _refuse_unused_options(self) -> None:
        """A stage that owns its update would silently ignore some shared options: refuse them when set."""
        defaults, values = TrainConfig.model_fields, self.config.model_dump()
        named = [name for name in self.method.unused_training_options if values[name] != defaults[name].default]
        if named:
            raise DebiasError(f"{self.method.name} does not use {', '.join(named)}: leave them at their defaults.")

    def _validate(self, world_size: int) -> None:
        accumulation = 1 if self.method.owns_update else self.config.grad_accum
        if self.per_step % (world_size * accumulation):
            raise DebiasError(
                f"batch_size: {self.per_step} examples per step must be divisible by processes x accumulation "
                f"steps ({world_size} x {accumulation}), so every process sees an equal share of the same "
                "global batch."
            )

    def _fingerprint(self) -> str:
        """Options that change the result; a checkpoint from other options must not be resumed."""
        volatile = {"force", "keep_checkpoints", "checkpoint_every", "output", "snapshot_steps"}
        options = self.config.model_dump(mode="json", exclude=volatile)
        options.update(method=self.method.options(), stage=self.method.name)
        return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()

    def _setup(self):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, set_seed

        from debias_plugin.models import load_model

        config = self.config
        accumulation = GradientAccumulationPlugin(
            num_steps=1 if self.method.owns_update else config.grad_accum, sync_with_dataloader=False)
        # cpu=True when there is no accelerator, so torchrun-style launches become gloo DDP (MULTI_CPU).
        settings = dict(mixed_precision=_PRECISIONS[config.precision], gradient_accumulation_plugin=accumulation,
                        cpu=torch.accelerator.current_accelerator() is None)
        try:
            accelerator = Accelerator(**settings)
        except ValueError:  # an earlier train() in this process fixed another precision: start afresh
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
            accelerator = Accelerator(**settings)
        self._validate(accelerator.num_processes)
        set_seed(config.seed)
        if accelerator.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        model, tokenizer, kind = load_model(config.model, allow_pickle=config.allow_pickle,
                                            trust_remote_code=config.trust_remote_code)
        run = Run(config=config, model=model, tokenizer=tokenizer, kind=kind, accelerator=accelerator)
        examples = list(self.method.setup(run))
        if not examples:
            raise DebiasError(f"{self.method.name}: no training examples (the corpus gave nothing to train on).")
        run.model = accelerator.prepare(run.model)  # on the device (and DDP-wrapped) before the optimizer sees it
        if self.method.uses_optimizer:
            from transformers import get_scheduler

            trainable = [p for p in run.unwrapped.parameters() if p.requires_grad]
            run.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
            run.scheduler = get_scheduler(config.scheduler, run.optimizer, num_warmup_steps=config.warmup_steps,
                                          num_training_steps=config.steps)
        return run, examples

    # -- checkpoints --------------------------------------------------------------------------------------
    def _latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        return folder if folder.is_dir() else None

    def _save_checkpoint(self, run: Run) -> None:
        """Weights, optimizer, scheduler, RNG of every process, history: written aside, then pointed to."""
        import torch
        from safetensors.torch import save_model

        check_finite(run.unwrapped, run.step)
        accelerator = run.accelerator
        name = f"step-{run.step:08d}"
        staging = self.checkpoints / f"{name}.tmp"
        if run.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), staging / f"rng-{accelerator.process_index}.pt")
        if run.is_main:
            save_model(run.unwrapped, str(staging / "model.safetensors"))
            state = {"step": run.step, "fingerprint": self._fingerprint(), "history": self.history,
                     "losses": self.losses}
            if run.optimizer is not None:
                state["optimizer"] = run.optimizer.state_dict()
                state["scheduler"] = run.scheduler.state_dict()
            state["method"] = self.method.state_dict()
            torch.save(state, staging / "trainer.pt")
        accelerator.wait_for_everyone()
        if run.is_main:
            final = self.checkpoints / name
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            pointer = self.checkpoints / "latest.tmp"
            pointer.write_text(name)
            os.replace(pointer, self.checkpoints / "latest")
            for old in self.checkpoints.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def _resume(self, run: Run) -> None:
        import torch
        from safetensors.torch import load_model

        folder = self._latest_checkpoint()
        if folder is None:
            return
        try:
            state = torch.load(folder / "trainer.pt", weights_only=True)  # weights_only: no code runs on load
            rng_state = torch.load(folder / f"rng-{run.accelerator.process_index}.pt", weights_only=True)
        except FileNotFoundError:
            raise DebiasError(f"{folder} was written by another number of processes or is incomplete; resume "
                              "with the same process count, or delete that folder to start afresh.") from None
        except Exception as err:  # truncated or corrupt: torch raises several unpickling/runtime errors
            raise DebiasError(f"{folder} is corrupt ({type(err).__name__}: {' '.join(str(err).split())[:300]}); "
                              f"delete {self.checkpoints} to start afresh.") from None
        if state["fingerprint"] != self._fingerprint():
            raise DebiasError(
                f"{self.checkpoints} holds a checkpoint of a run with other options; delete that folder "
                "(or rerun with the same options to resume it)."
            )
        try:
            load_model(run.unwrapped, str(folder / "model.safetensors"))
        except Exception as err:  # safetensors' own error type for a truncated file, OSError, shape mismatches
            raise DebiasError(f"{folder}/model.safetensors is corrupt ({' '.join(str(err).split())[:300]}); "
                              f"delete {self.checkpoints} to start afresh.") from None
        if run.optimizer is not None:
            run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.history, self.losses = state["history"], state["losses"]
        run.step = state["step"]
        _set_rng_state(rng_state)
        if run.is_main:
            logger.info("Resuming %s from %s (step %d).", self.method.name, folder, run.step)

    # -- loop ---------------------------------------------------------------------------------------------
    def _evaluate(self, run: Run) -> dict:
        import torch

        model = run.unwrapped
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = self.method.evaluate(run)
        model.train(was_training)
        return {key: float(value) for key, value in metrics.items()}

    def _batch(self, run: Run, examples: list, order: StreamOrder, positions: list[int]) -> dict:
        import torch

        batch = self.method.collate([examples[order[p]] for p in positions], positions)
        return {k: v.to(run.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _train_step(self, run: Run, examples: list, order: StreamOrder) -> float:
        """One optimizer step over the global batch; this process takes its share of each micro-step."""
        import torch

        config, accelerator = self.config, run.accelerator
        start = run.step * self.per_step
        rank, world = accelerator.process_index, accelerator.num_processes
        if self.method.owns_update:
            share = self.per_step // world
            positions = list(range(start + rank * share, start + (rank + 1) * share))
            return float(self.method.update(run, self._batch(run, examples, order, positions)))
        micro = self.per_step // (world * config.grad_accum)
        total = torch.zeros((), device=run.device)
        for m in range(config.grad_accum):
            first = start + (m * world + rank) * micro
            batch = self._batch(run, examples, order, list(range(first, first + micro)))
            with accelerator.accumulate(run.model):  # DDP syncs gradients on the last micro-step only
                loss = self.method.loss(run.model, batch)
                accelerator.backward(loss)  # divides by grad_accum
            total += loss.detach() / config.grad_accum
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return float(accelerator.reduce(total, reduction="mean"))

    def run(self) -> Path:
        from tqdm.auto import tqdm

        started = time.time()
        self.method.read_inputs()
        run, examples = self._setup()
        config = self.config
        abort_after = int(os.environ.get(ABORT_ENV, "0") or 0)
        start_metrics = self._evaluate(run)
        self._resume(run)
        if not self.history and config.eval_every:
            self.history.append({"step": 0, **start_metrics})
        run.unwrapped.train(config.dropout)
        order = StreamOrder(len(examples), config.seed)
        bar = tqdm(total=config.steps, initial=run.step, desc=self.method.name, disable=not run.is_main)
        while run.step < config.steps:
            loss = self._train_step(run, examples, order)
            run.step += 1
            if not math.isfinite(loss):
                raise DebiasError(f"{self.method.name}: the loss became {loss} at step {run.step}; nothing was "
                                  "published. Lower the learning rate (lr) or check the data.")
            self.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if config.eval_every and (run.step % config.eval_every == 0 or run.step == config.steps):
                self.history.append({"step": run.step, **self._evaluate(run)})
                run.unwrapped.train(config.dropout)
            if run.step in config.snapshot_steps:
                self._save_snapshot(run)
            if config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step < config.steps:
                self._save_checkpoint(run)
            if abort_after and run.step == abort_after:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        end_metrics = self.history[-1] if self.history and self.history[-1]["step"] == config.steps else None
        end_metrics = {k: v for k, v in end_metrics.items() if k != "step"} if end_metrics else self._evaluate(run)
        check_finite(run.unwrapped, run.step)
        results = {"metrics": {"start": start_metrics, "end": end_metrics}, "history": self.history,
                   "losses": self.losses, "report": self.method.report()}
        timings = {"wall_seconds": round(time.time() - started, 2), "processes": run.world_size,
                   "device": str(run.device)}
        if run.is_main:
            self._save_final(run, manifest(self.method.name, options={**config.model_dump(mode="json"),
                                                                      "method": self.method.options()},
                                           inputs={"model": config.model, **self.method.inputs()},
                                           results=results, timings=timings))
        run.accelerator.wait_for_everyone()
        return self.output

    def _save_snapshot(self, run: Run) -> None:
        """A loadable model folder of this step (for checkpoint sweeps), published like the final output."""
        check_finite(run.unwrapped, run.step)
        if run.is_main:
            folder = OutputFolder(self.snapshots / f"step-{run.step}", force=True)
            record = manifest(self.method.name, options={**self.config.model_dump(mode="json"),
                                                         "method": self.method.options()},
                              inputs={"model": self.config.model}, hash_inputs=False,
                              results={"step": run.step, "losses": list(self.losses)})
            with folder.staging() as staging:
                self.method.save(run, staging)
                run.tokenizer.save_pretrained(staging)
                folder.publish(staging, record)
        run.accelerator.wait_for_everyone()

    def _save_final(self, run: Run, record: dict) -> None:
        """Model, tokenizer and manifest in a staging folder, then one rename: no half-written model folder."""
        with self.folder.staging() as staging:
            self.method.save(run, staging)
            run.tokenizer.save_pretrained(staging)
            self.folder.publish(staging, record)
        if not self.config.keep_checkpoints:
            shutil.rmtree(self.checkpoints, ignore_errors=True)


def check_finite(model, step: int) -> None:
    """Never checkpoint or publish a model with NaN or infinite weights."""
    import torch

    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter.detach()).all():
            raise DebiasError(f"The weights became non-finite by step {step} (first: {name}); nothing was "
                              "published. Lower the learning rate (lr) or check the data.")


def train(config: TrainConfig, method: TrainingMethod) -> Path:
    """Train `method` under `config` and return the written output folder."""
    return Trainer(config, method).run()
