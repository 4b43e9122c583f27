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

Big models (docs/SCALING.md has the memory formulas): ``weights_dtype="bf16"`` loads, trains and writes bf16
weights; ``precision="bf16"`` runs the forward passes under accelerate's autocast; ``gradient_checkpointing``
recomputes layer activations in the backward pass. Full-weight stages also run sharded under FSDP
(``accelerate launch --config_file`` with ``distributed_type: FSDP``): the optimizer is then prepared together
with the model, and saving gathers the full state dict first. Stages whose update needs whole gradients (PCGU)
or that train LoRA refuse FSDP before loading anything (`TrainingMethod.sharding_refusal`); DeepSpeed is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, FiniteFloat, model_validator

from debias_plugin.errors import DebiasError, one_line
from debias_plugin.methods.base import StreamOrder, TrainingMethod, modes_kept
from debias_plugin.options import Options
from debias_plugin.outputs import MANIFEST_NAME, OutputFolder, manifest  # noqa: F401  (MANIFEST_NAME: API)

logger = logging.getLogger(__name__)

_PRECISIONS = {"fp32": "no", "bf16": "bf16"}
_UNSUPPORTED_DISTRIBUTIONS = ("DEEPSPEED", "MEGATRON_LM", "XLA")
_NEW_FIELDS = {"weights_dtype": "fp32", "gradient_checkpointing": False}  # left out of old runs' fingerprints
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
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: mixed precision through accelerate "
                                                                   "(forward passes under autocast).")
    weights_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="dtype of the weights in memory and in the written model. bf16 halves weight, gradient "
                            "and optimizer memory (LoRA adapters stay fp32), but a full-weight update smaller than "
                            "~1/256 of a weight rounds away (docs/SCALING.md).")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward "
                                                            "pass: less activation memory, ~1/3 more compute.")
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


def weights_dtype(config: TrainConfig):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[config.weights_dtype]


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
    full_state: Any = None  # under FSDP while saving: the gathered state dict (main process)
    saved_use_cache: bool | None = None  # config.use_cache to write back (checkpointing trains with it off)

    @property
    def sharded(self) -> bool:
        """True under FSDP: each process holds a shard of the weights."""
        return self.accelerator is not None and self.accelerator.distributed_type == "FSDP"

    @property
    def eval_model(self):
        """The model to call outside the training step: the bare model, or under FSDP the sharded root (whose
        forward gathers the weights)."""
        return self.model if self.sharded else self.unwrapped

    def save_pretrained(self, model, folder) -> None:
        """model.save_pretrained as safetensors; under FSDP from the gathered full state dict."""
        extra = {} if self.full_state is None else {"state_dict": self.full_state}
        config = getattr(model, "config", None)
        restore = self.saved_use_cache is not None and config is not None
        if restore:
            config.use_cache = self.saved_use_cache
        try:
            model.save_pretrained(folder, safe_serialization=True, **extra)
        finally:
            if restore:
                config.use_cache = False

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

    def _validate(self, world_size: int, distributed_type: str = "NO") -> None:
        self._check_distribution(distributed_type)
        accumulation = 1 if self.method.owns_update else self.config.grad_accum
        if self.per_step % (world_size * accumulation):
            raise DebiasError(
                f"batch_size: {self.per_step} examples per step must be divisible by processes x accumulation "
                f"steps ({world_size} x {accumulation}), so every process sees an equal share of the same "
                "global batch."
            )

    def _check_distribution(self, distributed_type: str) -> None:
        """What this loop cannot do under the launcher's distribution, refused before any model loads."""
        if distributed_type in _UNSUPPORTED_DISTRIBUTIONS:
            raise DebiasError(f"{self.method.name}: accelerate's {distributed_type} mode is not supported (its engine "
                              "owns the optimizer step this loop takes). For sharded full-weight training use FSDP "
                              "(distributed_type: FSDP in the accelerate config; see docs/SCALING.md).")
        if distributed_type != "FSDP":
            return
        refusal = self.method.sharding_refusal()
        if refusal:
            raise DebiasError(f"{self.method.name} under FSDP: {refusal}")
        if self.config.checkpoint_every:
            raise DebiasError("checkpoint_every: resumable checkpoints are not written under FSDP (the optimizer state "
                              "is sharded); use snapshot_steps for model folders along the way, or run without FSDP.")

    def _fingerprint(self) -> str:
        """Options that change the result; a checkpoint from other options must not be resumed."""
        volatile = {"force", "keep_checkpoints", "checkpoint_every", "output", "snapshot_steps"}
        volatile |= {name for name, default in _NEW_FIELDS.items() if getattr(self.config, name) == default}
        options = self.config.model_dump(mode="json", exclude=volatile)
        options.update(method=self.method.options(), stage=self.method.name)
        return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()

    def _setup(self):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin, set_seed

        from debias_plugin.models import load_model

        config = self.config
        accumulation = GradientAccumulationPlugin(
            num_steps=1 if self.method.owns_update else config.grad_accum, sync_with_dataloader=False)
        # cpu=True when there is no accelerator, so torchrun-style launches become gloo DDP (MULTI_CPU).
        # DDP's gradients as views of its all-reduce buckets: no second copy of every gradient per process
        settings = dict(mixed_precision=_PRECISIONS[config.precision], gradient_accumulation_plugin=accumulation,
                        cpu=torch.accelerator.current_accelerator() is None,
                        kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
        try:
            accelerator = Accelerator(**settings)
        except ValueError:  # an earlier train() in this process fixed another precision: start afresh
            from accelerate.state import AcceleratorState

            # accelerate keeps one AcceleratorState per process, refuses to change its mixed precision and has no
            # public reset (its own tests and transformers' Trainer call this same private method); the process
            # state (device, process group) is kept.
            AcceleratorState._reset_state(reset_partial_state=False)
            accelerator = Accelerator(**settings)
        self._validate(accelerator.num_processes, str(accelerator.distributed_type))
        set_seed(config.seed)
        if accelerator.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        model, tokenizer, kind = load_model(config.model, allow_pickle=config.allow_pickle,
                                            trust_remote_code=config.trust_remote_code, dtype=weights_dtype(config))
        use_cache = enable_checkpointing(model, config) if config.gradient_checkpointing else None
        run = Run(config=config, model=model, tokenizer=tokenizer, kind=kind, accelerator=accelerator,
                  saved_use_cache=use_cache)
        examples = list(self.method.setup(run))
        if not examples:
            raise DebiasError(f"{self.method.name}: no training examples (the corpus gave nothing to train on).")
        if run.sharded and self.method.uses_optimizer:  # FSDP: the optimizer is prepared with the model (shards)
            optimizer = self._optimizer(run.model.parameters(), fused=False)
            run.model, run.optimizer = accelerator.prepare(run.model, optimizer)
            self._scheduler(run, run.optimizer.optimizer)
            return run, examples
        run.model = accelerator.prepare(run.model)  # on the device (and DDP-wrapped) before the optimizer sees it
        if self.method.uses_optimizer:
            run.optimizer = self._optimizer(run.unwrapped.parameters(), fused=accelerator.device.type == "cuda")
            self._scheduler(run, run.optimizer)
        return run, examples

    def _optimizer(self, parameters, *, fused: bool):
        """AdamW over the trainable weights; fused on CUDA (no foreach temporaries the size of the model)."""
        import torch

        trainable = [p for p in parameters if p.requires_grad]
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(trainable, lr=self.config.lr, weight_decay=self.config.weight_decay, **extra)

    def _scheduler(self, run: Run, optimizer) -> None:
        """transformers' schedule on the bare optimizer: stepped once per optimizer step, whatever the processes."""
        from transformers import get_scheduler

        run.scheduler = get_scheduler(self.config.scheduler, optimizer, num_warmup_steps=self.config.warmup_steps,
                                      num_training_steps=self.config.steps)

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

        check_finite(run.unwrapped, run.step, run.accelerator)
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
                     "losses": self.losses, "method": self.method.state_dict()}
            if run.optimizer is not None:
                state["optimizer"] = run.optimizer.state_dict()
                state["scheduler"] = run.scheduler.state_dict()
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
        if run.sharded:
            raise DebiasError(f"{folder} holds a checkpoint of an unsharded run, which cannot be resumed under FSDP; "
                              f"resume it without FSDP, or delete {self.checkpoints} to start afresh.")
        try:
            state = torch.load(folder / "trainer.pt", weights_only=True)  # weights_only: no code runs on load
            rng_state = torch.load(folder / f"rng-{run.accelerator.process_index}.pt", weights_only=True)
        except FileNotFoundError:
            raise DebiasError(f"{folder} was written by another number of processes or is incomplete; resume "
                              "with the same process count, or delete that folder to start afresh.") from None
        except Exception as err:  # truncated or corrupt: torch raises several unpickling/runtime errors
            raise DebiasError(f"{folder} is corrupt ({type(err).__name__}: {one_line(err, 300)}); "
                              f"delete {self.checkpoints} to start afresh.") from None
        if state["fingerprint"] != self._fingerprint():
            raise DebiasError(
                f"{self.checkpoints} holds a checkpoint of a run with other options; delete that folder "
                "(or rerun with the same options to resume it)."
            )
        try:
            load_model(run.unwrapped, str(folder / "model.safetensors"))
        except Exception as err:  # safetensors' own error type for a truncated file, OSError, shape mismatches
            raise DebiasError(f"{folder}/model.safetensors is corrupt ({one_line(err, 300)}); "
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
        with modes_kept(model), torch.no_grad(), run.accelerator.autocast():
            model.eval()
            metrics = self.method.evaluate(run)
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
        start_metrics = self._evaluate(run)
        self._resume(run)
        if not self.history and config.eval_every:
            self.history.append({"step": 0, **start_metrics})
        train_mode(run.unwrapped, config.dropout)
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
            if run.step in config.snapshot_steps:
                self._save_snapshot(run)
            if config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step < config.steps:
                self._save_checkpoint(run)
        bar.close()
        end_metrics = self.history[-1] if self.history and self.history[-1]["step"] == config.steps else None
        end_metrics = {k: v for k, v in end_metrics.items() if k != "step"} if end_metrics else self._evaluate(run)
        check_finite(run.unwrapped, run.step, run.accelerator)
        results = {"metrics": {"start": start_metrics, "end": end_metrics}, "history": self.history,
                   "losses": self.losses, "report": self.method.report()}
        timings = {"wall_seconds": round(time.time() - started, 2), "processes": run.world_size,
                   "device": str(run.device)}
        with gathered_weights(run):
            if run.is_main:
                self._publish(run, self.folder, manifest(self.method.name, options=self._options(),
                                                         inputs={"model": config.model, **self.method.inputs()},
                                                         results=results, timings=timings))
        if run.is_main and not config.keep_checkpoints:
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        run.accelerator.wait_for_everyone()
        return self.output

    def _save_snapshot(self, run: Run) -> None:
        """A loadable model folder of this step (for checkpoint sweeps), published like the final output."""
        check_finite(run.unwrapped, run.step, run.accelerator)
        with gathered_weights(run):
            if run.is_main:
                record = manifest(self.method.name, options=self._options(), inputs={"model": self.config.model},
                                  hash_inputs=False, results={"step": run.step, "losses": list(self.losses)})
                self._publish(run, OutputFolder(self.snapshots / f"step-{run.step}", force=True), record)
        run.accelerator.wait_for_everyone()

    def _options(self) -> dict:
        """The manifest's options: the shared ones and, under "method", the stage's own."""
        return {**self.config.model_dump(mode="json"), "method": self.method.options()}

    def _publish(self, run: Run, folder: OutputFolder, record: dict) -> None:
        """Model, tokenizer and manifest in a staging folder, then one rename: no half-written model folder."""
        with folder.staging() as staging:
            self.method.save(run, staging)
            run.tokenizer.save_pretrained(staging)
            folder.publish(staging, record)


def check_finite(model, step: int, accelerator=None) -> None:
    """Never checkpoint or publish a model with NaN or infinite weights (under FSDP: every process's shards).

    One sum per tensor in its own dtype (NaN and inf propagate through it; no temporary copy) instead of an
    elementwise mask, which for bf16 weights costs a float32 copy of each tensor; only a tensor whose sum is not
    finite is checked element by element (a sum can overflow where no weight is infinite)."""
    import torch

    named = [(name, getattr(p, "to_local", lambda p=p: p)().detach()) for name, p in model.named_parameters()]
    if not named:
        return
    bad = ~torch.isfinite(torch.stack([tensor.sum().float() for _, tensor in named]))
    if bool(bad.any()):
        for index in bad.nonzero()[:, 0].tolist():
            bad[index] = not bool(torch.isfinite(named[index][1]).all())
    if accelerator is not None and accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.to(accelerator.device, torch.int32), reduction="sum") > 0
    if bool(bad.any()):
        first = named[int(bad.to(torch.int32).argmax())][0]
        raise DebiasError(f"The weights became non-finite by step {step} (first: {first}); nothing was "
                          "published. Lower the learning rate (lr) or check the data.")


def enable_checkpointing(model, config: TrainConfig) -> bool | None:
    """transformers' activation checkpointing of every layer (non-reentrant: works with LoRA and autograd.grad).

    Also turns the KV cache off (config.use_cache), which transformers would otherwise fill again when a layer is
    recomputed; returns the setting to write back into saved configs (None: the config has none)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise DebiasError(f"{config.model}: {type(model).__name__} does not support gradient checkpointing in "
                          "transformers; run without --gradient-checkpointing.")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # pragma: no cover - transformers before activation_checkpointing_enable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise DebiasError(f"{config.model}: {type(model).__name__} has no layers transformers can checkpoint; run "
                          "without --gradient-checkpointing.")
    if not config.dropout:  # layers then train in training mode with dropout off: they must not drop out themselves
        import inspect

        own = sorted({type(m).__name__ for m in layers if "self.training" in inspect.getsource(inspect.unwrap(
            type(m).forward))})
        if own:
            raise DebiasError(f"{config.model}: {', '.join(own)} applies dropout in its own forward, so "
                              "--gradient-checkpointing cannot train it with --no-dropout; keep dropout on.")
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    return use_cache


def train_mode(model, dropout: bool) -> None:
    """Training mode for the steps. Without dropout everything is in eval mode except checkpointed layers:
    transformers recomputes only layers in training mode, and their sublayers (where dropout lives) stay in eval."""
    model.train(dropout)
    if dropout:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


@contextmanager
def gathered_weights(run: Run):
    """Under FSDP every process joins in gathering the full state dict, which the main process then saves."""
    run.full_state = run.accelerator.get_state_dict(run.model) if run.sharded else None
    try:
        yield
    finally:
        run.full_state = None


def train(config: TrainConfig, method: TrainingMethod) -> Path:
    """Train `method` under `config` and return the written output folder."""
    return Trainer(config, method).run()
