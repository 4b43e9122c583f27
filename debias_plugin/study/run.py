"""`run_study`: prepare each model's shared stages once, run its sweeps (`run_sweep`), then tabulate."""

from __future__ import annotations

from pathlib import Path

from debias_plugin.errors import DebiasError
from debias_plugin.outputs import MANIFEST_NAME, claim_run_folder, read_manifest, write_text_atomically
from debias_plugin.study.config import STUDY_FILE, load_study
from debias_plugin.study.table import render_study
from debias_plugin.sweep.run import resolve_base, run_sweep


def run_study(path: str | Path, out: str | Path, *, force: bool = False, only: list[str] | None = None) -> Path:
    """Prepare, sweep and tabulate the study (or the `only` selectors' part of it) into DIR (a rerun resumes, and
    a later run with other selectors adds to the same table); returns DIR/study.md."""
    from debias_plugin.training import train

    study, out = load_study(path), Path(out).expanduser().resolve()
    plan = study.plan(out, only)  # every sweep and stage option validated before any model loads
    claim_run_folder(out, resumes=(out / STUDY_FILE).is_file(), force=force, inputs=study.inputs(),
                     refusal=f"--out {out} is not empty and does not hold a study (no {STUDY_FILE}); pass --force to "
                     "replace it, or choose another folder. A study folder is resumed (and extended by an edited "
                     "study file: each sweep and prepared stage checks its own settings).")
    write_text_atomically(out / STUDY_FILE, study.text)
    for model, parts in plan.items():
        base = resolve_base(next(iter(parts["sweeps"].values()))) if parts["prepare"] else None
        for config, method in parts["prepare"].values():
            config = config.model_copy(update={"model": str(base)})
            if (Path(config.output) / MANIFEST_NAME).is_file():
                _check_prepared(Path(config.output), config, method)
            else:
                train(config, method)
        (out / model).mkdir(exist_ok=True)  # a part with no prepared stage has nothing else that makes it
        for label, sweep in parts["sweeps"].items():
            write_text_atomically(out / model / f"{label}.yml", sweep.text)
            run_sweep(out / model / f"{label}.yml", out / model / label)
    return render_study(out, study)


def _check_prepared(folder: Path, config, method) -> None:
    """A prepared stage made by an earlier run is reused only if it was made with the same options."""
    volatile = ("output", "force", "keep_checkpoints", "checkpoint_every")
    wanted = {**config.model_dump(mode="json"), "method": method.options()}
    recorded = read_manifest(folder).get("options", {})
    changed = sorted(key for key in set(wanted) | set(recorded) if key not in volatile
                     and wanted.get(key) != recorded.get(key))
    if changed:
        raise DebiasError(f"{folder} was made with other options ({', '.join(changed)}) than the study file now "
                          "gives; delete that folder to remake it (and the sweeps that read it).")
