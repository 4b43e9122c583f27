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


def data_file(explicit: str | Path | None, relative: str, what: str) -> Path:
    """Resolve a data file: explicit path > `$DEBIAS_DATA_DIR/relative` > ../shared/data beside a checkout > the
    download cache, fetched on first use and checked by hash (debias_plugin.datafiles)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DebiasError(f"{what}: the file {path} does not exist.")
        return path
    if os.environ.get(DATA_DIR_ENV):
        root = Path(os.environ[DATA_DIR_ENV]).expanduser()
        path = root / relative
        if not path.is_file():
            raise DebiasError(f"{what}: the data folder {root} (${DATA_DIR_ENV}) has no file {relative} (looked for "
                              f"{path}); `debias data fetch --to {root}` writes every file we read there.")
        return path
    if (CHECKOUT_DATA_DIR / relative).is_file():
        return CHECKOUT_DATA_DIR / relative
    from debias_plugin.datafiles import cached

    return cached(relative, what)


def data_folder(relative: str, what: str) -> Path:
    """A folder of benchmark files (seat/, bbq/): under the data folder (data_root()), else fetched into the cache."""
    root = data_root()
    if root is None:
        from debias_plugin.datafiles import cached_folder

        return cached_folder(relative, what)
    folder = root / relative
    if not folder.is_dir():
        raise DebiasError(f"{what}: the data folder {root} has no folder {relative}/ (looked for {folder}).")
    return folder
