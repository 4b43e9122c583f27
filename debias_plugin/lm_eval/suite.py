"""The bias_suite preset: our local-data group plus lm-eval's own hub-data bias tasks when they are cached.

lm-eval fails a whole run when one task's dataset cannot be loaded, so members whose data is missing are left
out before lm-eval starts, each with a notice saying what is missing and how to get it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SUITE = "bias_suite"
# local-data members of the group in tasks/bias_suite/bias_suite.yaml -> the files they read under $DEBIAS_DATA_DIR
LOCAL_MEMBERS = {
    "crows_bias": ("crows_pairs/crows_pairs_anonymized.csv",),
    "stereoset_bias": ("stereoset/stereoset_dev.jsonl",),
    "bbq_local": ("bbq",),
}
# lm-eval's own bias tasks (a tag and a task) that read a hub dataset -> that dataset's repository
HUB_MEMBERS = {"winogender": "oskarvanderwal/winogender",
               "simple_cooccurrence_bias": "oskarvanderwal/simple-cooccurrence-bias"}


def hub_dataset_cached(repository: str) -> bool:
    """Whether a hub dataset repository has files in the local Hugging Face hub or datasets cache."""
    from datasets import config as datasets_config
    from huggingface_hub import constants

    owner, name = repository.split("/", 1)
    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{owner}--{name}" / "snapshots"
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / f"{owner}___{name.replace('-', '_')}"
    return (hub.is_dir() and any(hub.iterdir())) or prepared.is_dir()


def _offline() -> bool:
    return any(os.environ.get(flag, "").lower() in ("1", "true", "yes") for flag in ("HF_HUB_OFFLINE",
                                                                                  "HF_DATASETS_OFFLINE"))


def suite_tasks() -> list[str]:
    """The lm-eval task names `bias_suite` stands for here, logging a notice for every member left out."""
    from debias_plugin.paths import DATA_DIR_ENV, data_root

    root = data_root()
    local = []
    for task, files in LOCAL_MEMBERS.items():
        missing = [f for f in files if not (root / f).exists()] if root else []
        if not root and _offline():  # online, the loaders may fetch from the hub; offline there is nothing to read
            logger.warning("bias_suite: skipping %s: $%s is not set and the hub is offline.", task, DATA_DIR_ENV)
        elif missing:
            logger.warning("bias_suite: skipping %s: $%s=%s has no %s.", task, DATA_DIR_ENV, root, ", ".join(missing))
        else:
            local.append(task)
    tasks = [SUITE] if len(local) == len(LOCAL_MEMBERS) else local
    for task, repository in HUB_MEMBERS.items():
        if hub_dataset_cached(repository) or not _offline():
            tasks.append(task)
        else:
            logger.warning("bias_suite: skipping lm-eval's %s: its dataset %s is not in the local Hugging Face "
                           "cache and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE). Run it once with "
                           "network access to cache it.", task, repository)
    return tasks


def expand_task_presets(args: list[str]) -> list[str]:
    """`lm_eval run` arguments with `bias_suite` in --tasks replaced by the members available here."""
    args = list(args)
    for index, arg in enumerate(args):
        if arg == "--tasks" and index + 1 < len(args):
            position, value, prefix = index + 1, args[index + 1], ""
        elif arg.startswith("--tasks="):
            position, value, prefix = index, arg[len("--tasks="):], "--tasks="
        else:
            continue
        names = value.split(",")
        if SUITE in names:
            expanded = [n for name in names for n in (suite_tasks() if name == SUITE else [name])]
            args[position] = prefix + ",".join(dict.fromkeys(expanded))
        break
    return args
