"""Locate bundled folders (tasks/, merge_configs/) and benchmark data files."""

from __future__ import annotations

import os
from pathlib import Path

from debias_plugin.errors import DebiasError

DATA_DIR_ENV = "DEBIAS_DATA_DIR"
CACHE_ENV = "DEBIAS_CACHE_DIR"
_PACKAGE_DIR = Path(__file__).resolve().parent
# A source checkout with the benchmark files beside it (the layout CI and the tests use): ../shared/data
CHECKOUT_DATA_DIR = _PACKAGE_DIR.parent.parent / "shared" / "data"


def cache_root() -> Path:
    """Home of converted built-in models and cached evaluation results: $DEBIAS_CACHE_DIR or ~/.cache/debias_plugin."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "debias_plugin").expanduser()


def data_root() -> Path | None:
    """The benchmark data folder: $DEBIAS_DATA_DIR, else ../shared/data beside a source checkout, else None."""
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        return Path(root).expanduser()
    return CHECKOUT_DATA_DIR if CHECKOUT_DATA_DIR.is_dir() else None


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


def data_file(explicit: str | Path | None, relative: str, what: str, hub: tuple[str, str] | None = None) -> Path:
    """Resolve a data file: explicit path > `$DEBIAS_DATA_DIR/relative` > a file of a hub dataset repo."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DebiasError(f"{what}: the file {path} does not exist.")
        return path
    root = data_root()
    if root:
        path = root / relative
        if not path.is_file():
            raise DebiasError(f"{what}: the data folder {root} (${DATA_DIR_ENV}, or ../shared/data beside a "
                              f"checkout) has no file {relative} (looked for {path}).")
        return path
    if hub is None:
        raise DebiasError(f"{what}: no path given and ${DATA_DIR_ENV} is not set; pass the file's path or set "
                          f"{DATA_DIR_ENV} to the folder holding {relative}.")
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


def data_folder(relative: str, what: str) -> Path:
    """A folder of benchmark files under the data folder (data_root()), with the one error wording."""
    root = data_root()
    if root is None:
        raise DebiasError(f"{what}: no path given and ${DATA_DIR_ENV} is not set; pass the path or set "
                          f"{DATA_DIR_ENV} to a folder holding {relative}/.")
    folder = root / relative
    if not folder.is_dir():
        raise DebiasError(f"{what}: the data folder {root} has no folder {relative}/ (looked for {folder}).")
    return folder
