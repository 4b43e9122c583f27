"""`debias data list|fetch`: where each benchmark file is found now, and fetching it verified by hash."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("data")
def data_command():
    """The benchmark files we read: where each is found, and fetching them (pinned URLs, sha256-checked)."""


@data_command.command("list")
def list_command():
    """Each dataset: where its files are found now, their licence and size."""
    from debias_plugin.datafiles import datasets

    click.echo(f"{'dataset':16s} {'files':>5} {'bytes':>10}  {'found in':34s} licence")
    for name, files in datasets().items():
        click.echo(f"{name:16s} {len(files):>5} {sum(f.size for f in files):>10,}  {_where(files):34s} "
                   f"{files[0].licence}")


def _where(files) -> str:
    import os

    from debias_plugin.datafiles import cache_dir
    from debias_plugin.paths import CHECKOUT_DATA_DIR, DATA_DIR_ENV

    places = [(f"${DATA_DIR_ENV}", Path(os.environ[DATA_DIR_ENV]).expanduser())] if os.environ.get(DATA_DIR_ENV) \
        else [("checkout (../shared/data)", CHECKOUT_DATA_DIR)]
    places.append(("cache", cache_dir()))
    for label, folder in places:
        present = sum((folder / f.name).is_file() for f in files)
        if present == len(files):
            return label
        if present:
            return f"{label}: {present} of {len(files)}"
    return "not yet (fetched on first use)" if all(f.url for f in files) else "not found (no download)"


@data_command.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--to", "to", type=click.Path(file_okay=False, path_type=Path),
              help="Write the files into this data folder (usable as $DEBIAS_DATA_DIR) instead of the cache.")
@click.option("--from", "mirror", type=click.Path(file_okay=False, path_type=Path),
              help="Copy from this folder (a data folder laid out like ../shared/data) instead of downloading.")
def fetch_command(names: tuple[str, ...], to: Path | None, mirror: Path | None):
    """Fetch the datasets NAMES (default: every one that has an upstream), each file checked by its sha256."""
    from debias_plugin.datafiles import datasets, fetch
    from debias_plugin.errors import DebiasError

    known = datasets()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise DebiasError(f"debias data fetch: unknown dataset '{unknown[0]}'; expected one of {', '.join(known)}.")
    chosen = names or [name for name, files in known.items() if mirror or all(f.url for f in files)]
    files = [f.name for name in chosen for f in known[name]]
    for path in fetch(files, to=to, mirror_folder=mirror, notice=lambda text: click.echo(text, err=True)):
        click.echo(path)
