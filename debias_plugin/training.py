"""The training loop every debiasing stage shares: load, accelerate, accumulate, checkpoint, resume, save.

How a method plugs in
---------------------
`train(config, method)` runs any object with this shape (see `TrainingMethod`):

``stage``                       name written into the manifest ("unlearn", "finetune", "pcgu", ...).
``setup(run) -> list``          called once after the model is loaded and before it is prepared; reads
                                ``run.config``, ``run.tokenizer``, ``run.kind`` and returns the training
                                examples (any objects). It may replace ``run.model`` (e.g. wrap it with LoRA)
                                or freeze parameters: the optimizer sees parameters with ``requires_grad``.
``collate(examples, positions)`` one micro-batch -> dict of tensors (moved to the device by the core).
                                ``positions`` are the examples' places in the global training stream: seed any
                                randomness (MLM masking) from them, so a batch split across processes or
                                micro-steps sees the same randomness as one process.
``loss(model, batch)``          plain route: a scalar tensor that is the MEAN over the micro-batch's examples
                                of per-example losses; the core does backward, gradient accumulation, DDP
                                averaging, clipping, optimizer and scheduler steps.
Optional hooks:
``update(run, batch) -> float`` own the update step instead of ``loss`` (PCGU: per-sequence gradients and a
                                masked update). Called once per step with this process's share of the global
                                batch (``batch_size / world_size`` examples); returns the loss to display.
                                With several processes, backward through ``run.model`` (DDP) averages
                                gradients over processes; through ``run.unwrapped`` it does not.
                                Set ``uses_optimizer = False`` to skip creating the AdamW optimizer.
``evaluate(run) -> dict``       metrics at start and end (manifest) and every ``eval_every`` steps (history);
                                called on every process with ``run.unwrapped`` in eval mode, under no_grad.
``save(run, folder)``           write the trained model (default: ``save_pretrained`` as safetensors), e.g.
                                a peft adapter; the core adds the tokenizer and the manifest.
``state_dict()`` / ``load_state_dict(state)``  extra method state to checkpoint (tensors / plain values).
``input_files() -> list``       data files whose sha256 go into the manifest.
``options() -> dict``           method options for the manifest (and the resume fingerprint).
``report() -> dict``            facts worth keeping (e.g. texts skipped), into the manifest.

The global stream of examples is a fresh seeded permutation per epoch; step ``s`` uses stream positions
``[s*B, (s+1)*B)`` with ``B = batch_size``. That makes resuming a matter of restoring the step counter, and
makes 1 and N processes see the same global batch. Many processes: ``accelerate launch --multi_gpu
--num_processes N debias ...`` (on a CPU-only machine too: the core then runs gloo DDP; accelerate's own
``--cpu`` launcher starts a single process unless mpirun is configured), or ``torchrun --nproc_per_node N``. Checkpoints (every ``checkpoint_every`` steps) hold the
weights (safetensors), optimizer, scheduler, per-process RNG states, history and method state, in
``<output>.checkpoints/``; a rerun with the same options resumes from the latest one. The final folder is
written under a temporary name beside ``output`` and renamed into place.

Test hook: the environment variable ``DEBIAS_ABORT_AFTER_STEP=k`` makes every process SIGKILL itself right
after step k (after any checkpoint of that step), to test resume after a real kill.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from debias_plugin.errors import DebiasError
from debias_plugin.paths import publish_folder

logger = logging.getLogger(__name__)

MANIFEST_NAME = "debias_manifest.json"
ABORT_ENV = "DEBIAS_ABORT_AFTER_STEP"
_PRECISIONS = {"fp32": "no", "bf16": "bf16"}


@dataclass
class TrainConfig:
    """Options every stage shares; all of them go into the manifest and the resume fingerprint."""

    model: str
    output: str
    steps: int = 50
    batch_size: int = 8  # examples per optimizer step, over all processes and accumulation micro-steps
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    scheduler: str = "constant"  # any transformers.get_scheduler name: constant, linear, cosine, ...
    warmup_steps: int = 0
    max_grad_norm: float = 0.0  # 0 = no clipping
    max_length: int = 128
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (mixed precision through accelerate)
    dropout: bool = True  # False trains in eval mode: bit-comparable runs across process counts
    checkpoint_every: int = 0
    eval_every: int = 0
    force: bool = False
    keep_checkpoints: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False


class TrainingMethod(Protocol):
    """What `train` needs from a stage; optional hooks are listed in the module docstring."""

    stage: str

    def setup(self, run: "Run") -> list: ...

    def collate(self, examples: list, positions: list[int]) -> dict: ...

    def loss(self, model, batch: dict): ...


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


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_folder(output: str | Path, force: bool) -> Path:
    """Refuse to overwrite results: a non-empty output folder needs --force."""
    output = Path(output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise DebiasError(f"{output} exists and is not a folder; choose another output path.")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise DebiasError(f"{output} is not empty; pass --force to replace it, or choose another output folder.")
    return output


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("debias-plugin", "torch", "transformers", "accelerate", "peft", "safetensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


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

    def __init__(self, config: TrainConfig, method):
        self.config, self.method = config, method
        self.output = check_output_folder(config.output, config.force)
        self.checkpoints = self.output.parent / f"{self.output.name}.checkpoints"
        self.history: list[dict] = []
        self.losses: list[float] = []

    # -- setup --------------------------------------------------------------------------------------------
    def _validate(self, world_size: int) -> None:
        config = self.config
        if config.precision not in _PRECISIONS:
            raise DebiasError(f"--precision must be one of {sorted(_PRECISIONS)}, not '{config.precision}'.")
        if config.steps < 1 or config.batch_size < 1 or config.grad_accum < 1:
            raise DebiasError("--steps, --batch-size and --grad-accum must be at least 1.")
        owns_update = hasattr(self.method, "update")
        per_step_shares = world_size * (1 if owns_update else config.grad_accum)
        if config.batch_size % per_step_shares:
            raise DebiasError(
                f"--batch-size {config.batch_size} must be divisible by processes x accumulation steps "
                f"({world_size} x {1 if owns_update else config.grad_accum}), so every process sees an equal "
                "share of the same global batch."
            )

    def _fingerprint(self) -> str:
        """Options that change the result; a checkpoint from other options must not be resumed."""
        volatile = {"force", "keep_checkpoints", "checkpoint_every", "output"}
        options = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in volatile}
        options["method"] = getattr(self.method, "options", dict)()
        options["stage"] = self.method.stage
        return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()

    def _setup(self):
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from debias_plugin.models import load_model

        config = self.config
        # cpu=True when there is no accelerator, so torchrun-style launches become gloo DDP (MULTI_CPU).
        settings = dict(mixed_precision=_PRECISIONS.get(config.precision, "no"),
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
            raise DebiasError(f"{self.method.stage}: no training examples (the corpus gave nothing to train on).")
        run.model = accelerator.prepare(run.model)  # on the device (and DDP-wrapped) before the optimizer sees it
        if getattr(self.method, "uses_optimizer", True):
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
            if hasattr(self.method, "state_dict"):
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
        state = torch.load(folder / "trainer.pt", weights_only=True)
        if state["fingerprint"] != self._fingerprint():
            raise DebiasError(
                f"{self.checkpoints} holds a checkpoint of a run with other options; delete that folder "
                "(or rerun with the same options to resume it)."
            )
        rng_file = folder / f"rng-{run.accelerator.process_index}.pt"
        if not rng_file.is_file():
            raise DebiasError(f"{folder} was written by fewer processes; resume with the same process count.")
        load_model(run.unwrapped, str(folder / "model.safetensors"))
        if run.optimizer is not None:
            run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
        if "method" in state:
            self.method.load_state_dict(state["method"])
        self.history, self.losses = state["history"], state["losses"]
        run.step = state["step"]
        _set_rng_state(torch.load(rng_file, weights_only=True))
        if run.is_main:
            logger.info("Resuming %s from %s (step %d).", self.method.stage, folder, run.step)

    # -- loop ---------------------------------------------------------------------------------------------
    def _evaluate(self, run: Run) -> dict:
        import torch

        if not hasattr(self.method, "evaluate"):
            return {}
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
        start = run.step * config.batch_size
        rank, world = accelerator.process_index, accelerator.num_processes
        if hasattr(self.method, "update"):
            share = config.batch_size // world
            positions = list(range(start + rank * share, start + (rank + 1) * share))
            return float(self.method.update(run, self._batch(run, examples, order, positions)))
        micro = config.batch_size // (world * config.grad_accum)
        total = torch.zeros((), device=run.device)
        for m in range(config.grad_accum):
            first = start + (m * world + rank) * micro
            batch = self._batch(run, examples, order, list(range(first, first + micro)))
            last = m == config.grad_accum - 1
            with nullcontext() if last or world == 1 else accelerator.no_sync(run.model):
                loss = self.method.loss(run.model, batch) / config.grad_accum
                accelerator.backward(loss)
            total += loss.detach()
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return float(accelerator.reduce(total, reduction="mean"))

    def run(self) -> Path:
        from tqdm.auto import tqdm

        started = time.time()
        run, examples = self._setup()
        config = self.config
        abort_after = int(os.environ.get(ABORT_ENV, "0") or 0)
        start_metrics = self._evaluate(run)
        self._resume(run)
        if not self.history and config.eval_every:
            self.history.append({"step": 0, **start_metrics})
        run.unwrapped.train(config.dropout)
        order = StreamOrder(len(examples), config.seed)
        bar = tqdm(total=config.steps, initial=run.step, desc=self.method.stage, disable=not run.is_main)
        while run.step < config.steps:
            loss = self._train_step(run, examples, order)
            run.step += 1
            self.losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if config.eval_every and (run.step % config.eval_every == 0 or run.step == config.steps):
                self.history.append({"step": run.step, **self._evaluate(run)})
                run.unwrapped.train(config.dropout)
            if config.checkpoint_every and run.step % config.checkpoint_every == 0 and run.step < config.steps:
                self._save_checkpoint(run)
            if abort_after and run.step == abort_after:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        end_metrics = self.history[-1] if self.history and self.history[-1]["step"] == config.steps else None
        end_metrics = {k: v for k, v in end_metrics.items() if k != "step"} if end_metrics else self._evaluate(run)
        manifest = {
            "stage": self.method.stage,
            "base_model": str(Path(config.model).expanduser().resolve()),
            "options": {**dataclasses.asdict(config), "method": getattr(self.method, "options", dict)()},
            "data": {str(Path(p).resolve()): sha256_file(p) for p in getattr(self.method, "input_files", list)()},
            "metrics": {"start": start_metrics, "end": end_metrics},
            "history": self.history,
            "losses": self.losses,
            "report": getattr(self.method, "report", dict)(),
            "processes": run.world_size,
            "device": str(run.device),
            "wall_seconds": round(time.time() - started, 2),
            "packages": package_versions(),
        }
        if run.is_main:
            self._save_final(run, manifest)
        run.accelerator.wait_for_everyone()
        return self.output

    def _save_final(self, run: Run, manifest: dict) -> None:
        """Write beside the output under a temporary name, then rename: no half-written model folder."""
        staging = self.output.parent / f".{self.output.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if hasattr(self.method, "save"):
                self.method.save(run, staging)
            else:
                run.unwrapped.save_pretrained(staging, safe_serialization=True)
            run.tokenizer.save_pretrained(staging)
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            check_output_folder(self.output, self.config.force)
            publish_folder(staging, self.output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if not self.config.keep_checkpoints:
            shutil.rmtree(self.checkpoints, ignore_errors=True)


def train(config: TrainConfig, method) -> Path:
    """Train `method` under `config` and return the written output folder."""
    return Trainer(config, method).run()


def click_training_options(function):
    """The CLI flags every training stage shares (defaults are Lu et al.'s: batch 8, 50 steps, lr 1e-5)."""
    import click

    options = [
        click.option("--model", "model", required=True, type=click.Path(), help="Hugging Face model folder."),
        click.option("--output", "output", required=True, type=click.Path(), help="Folder to write."),
        click.option("--steps", default=50, show_default=True, help="Optimizer steps."),
        click.option("--batch-size", default=8, show_default=True,
                     help="Examples per optimizer step, over all processes and accumulation micro-steps."),
        click.option("--grad-accum", default=1, show_default=True, help="Micro-steps per optimizer step."),
        click.option("--lr", default=1e-5, show_default=True, type=float, help="AdamW learning rate."),
        click.option("--weight-decay", default=0.0, show_default=True, type=float),
        click.option("--scheduler", default="constant", show_default=True,
                     help="transformers scheduler name: constant, linear, cosine, ..."),
        click.option("--warmup-steps", default=0, show_default=True),
        click.option("--max-grad-norm", default=0.0, show_default=True, type=float, help="0 = no clipping."),
        click.option("--max-length", default=128, show_default=True, help="Tokens per text (truncated)."),
        click.option("--seed", default=0, show_default=True),
        click.option("--precision", type=click.Choice(sorted(_PRECISIONS)), default="fp32", show_default=True),
        click.option("--dropout/--no-dropout", default=True, show_default=True,
                     help="--no-dropout trains in eval mode (identical results for any process count)."),
        click.option("--checkpoint-every", default=0, show_default=True,
                     help="Save a resumable checkpoint every N steps in OUTPUT.checkpoints/ (0 = never)."),
        click.option("--eval-every", default=0, show_default=True, help="Log evaluation metrics every N steps."),
        click.option("--force", is_flag=True, help="Replace a non-empty output folder."),
        click.option("--keep-checkpoints", is_flag=True, help="Keep OUTPUT.checkpoints/ after success."),
        click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights you trust."),
        click.option("--trust-remote-code", is_flag=True, help="Run the model folder's own code (unsafe)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def config_from_options(options: dict) -> tuple[TrainConfig, dict]:
    """Split click's keyword arguments into the shared TrainConfig and the method's own options."""
    names = {field.name for field in dataclasses.fields(TrainConfig)}
    shared = {k: v for k, v in options.items() if k in names}
    return TrainConfig(**shared), {k: v for k, v in options.items() if k not in names}
