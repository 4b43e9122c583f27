"""Locate bundled folders (tasks/, merge_configs/) and benchmark data files."""

from __future__ import annotations

import os
from pathlib import Path

from debias_plugin.errors import DebiasError

DATA_DIR_ENV = "DEBIAS_DATA_DIR"
_PACKAGE_DIR = Path(__file__).resolve().parent


def bundled_path(name: str) -> Path:
    """Path of a top-level bundled folder, from a wheel (inside the package) or a source checkout."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise DebiasError(
        f"The bundled folder '{name}/' was not found next to the debias_plugin package "
        f"(looked in {_PACKAGE_DIR / name} and {_PACKAGE_DIR.parent / name}). "
        "Reinstall the package (pip install debias-plugin) or run from a source checkout."
    )


def tasks_dir() -> Path:
    return bundled_path("tasks")


def merge_configs_dir() -> Path:
    return bundled_path("merge_configs")


def data_file(
    explicit: str | Path | None, relative: str, what: str, hub: tuple[str, str] | None = None
) -> Path:
    """Resolve a data file: explicit path > `$DEBIAS_DATA_DIR/relative` > a file of a hub dataset repo."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DebiasError(f"{what}: the file {path} does not exist.")
        return path
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        path = Path(root).expanduser() / relative
        if not path.is_file():
            raise DebiasError(f"{what}: ${DATA_DIR_ENV}={root} has no file {relative} (looked for {path}).")
        return path
    if hub is None:
        raise DebiasError(f"{what}: no path given and ${DATA_DIR_ENV} is not set; pass the file's path.")
    repo_id, filename = hub
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except Exception as err:  # offline, gated, renamed: all mean "give us a local file"
        raise DebiasError(
            f"{what}: no path given, ${DATA_DIR_ENV} is not set, and downloading {filename} from the hub "
            f"dataset {repo_id} failed ({type(err).__name__}). Pass the file's path or set {DATA_DIR_ENV} "
            f"to a folder holding {relative}."
        ) from None

