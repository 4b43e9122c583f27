"""One rule for every folder a stage writes: no overlap with inputs, --force to replace, staged, renamed, manifested.

Every stage (training, negate, default-model) writes through `OutputFolder`:

    folder = OutputFolder(out, inputs=[model, corpus], force=force)   # all checks, before any model loads
    with folder.staging() as staging:                                   # a hidden sibling, removed on failure
        ...write files into staging...
        folder.publish(staging, manifest)                               # manifest + atomic rename into place

The manifest has one schema for every stage (`manifest()` builds it). The overlap rule itself is `refuse_overlap()`:
every output of every command (a model folder, a sweep or study folder, a report file) against every file or folder
it reads, compared as the OS will write them (symlinks and '..' resolved, the same folder reached another way).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from debias_plugin.errors import DebiasError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "debias_manifest.json"
MANIFEST_SCHEMA = "debias_plugin.manifest/1"
_STAGING = ".{name}.tmp-{pid}-{token}"
_VERSIONED_PACKAGES = ("debias-plugin", "torch", "transformers", "accelerate", "peft", "safetensors", "mergekit",
                       "lm-eval")


def real_path(path: str | Path) -> Path:
    """Absolute, with '~', '..' and every symlink resolved as the OS will when it writes (trailing '/' dropped)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def overlaps(first: str | Path, second: str | Path) -> bool:
    """Either path is the other or lies inside it, after resolving symlinks and '..'; by identity too (a folder
    reached through a bind mount or another case on a case-insensitive disk is the same folder)."""
    a, b = real_path(first), real_path(second)
    return a == b or b in a.parents or a in b.parents or _inside_by_identity(a, b) or _inside_by_identity(b, a)


def _inside_by_identity(inner: Path, outer: Path) -> bool:
    """`outer` is the same file as `inner` or one of its existing parents (device and inode compared)."""
    try:
        target = os.stat(outer)
    except (OSError, ValueError):
        return False
    for candidate in (inner, *inner.parents):
        with contextlib.suppress(OSError, ValueError):
            if os.path.samestat(os.stat(candidate), target):
                return True
    return False


def refuse_overlap(output: str | Path, inputs: Iterable[str | Path | None], what: str = "--output", *,
                   replaced: bool = True) -> None:
    """The rule for every output of every command: one that is or lies inside any input it reads is refused, --force
    or not; so is one that contains an input when the output is `replaced` as a whole (that would delete the input).
    A folder only added to (lm-eval's timestamped results) may hold inputs."""
    out = real_path(output)
    for given in inputs:
        if given is None:
            continue
        source = real_path(given)
        clash = overlaps(out, source) if replaced else (out == source or _inside(out, source))
        if clash:
            raise DebiasError(f"{what} {out} overlaps the input {source}: writing it would destroy that input. Choose "
                              "an output folder outside every input (--force does not change this).")


def _inside(inner: Path, outer: Path) -> bool:
    return outer in inner.parents or _inside_by_identity(inner, outer)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


class OutputFolder:
    """A model folder (or file tree) to be written: every check at construction, the write all or nothing."""

    def __init__(self, path: str | Path, *, inputs: Iterable[str | Path | None] = (), force: bool = False,
                 option: str = "--output"):
        self.path = Path(path).expanduser().resolve()
        self.force, self.option = force, option
        refuse_overlap(self.path, inputs, option)
        self.check_replaceable()
        ancestor = next(p for p in (self.path.parent, *self.path.parent.parents) if p.exists())
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            raise DebiasError(f"{option} {self.path}: cannot create it, {ancestor} is not a writable folder.")
        self._remove_stale_staging()

    def check_replaceable(self) -> None:
        """An existing file, or a non-empty folder, is replaced only with --force."""
        path = self.path
        if path.is_symlink() or path.is_file():
            if not self.force:
                raise DebiasError(f"{self.option} {path} exists and is not a folder; pass --force to replace it, "
                                  "or choose another path.")
        elif path.is_dir() and any(path.iterdir()) and not self.force:
            raise DebiasError(f"{self.option} {path} is not empty; pass --force to replace it, or choose another "
                              "output folder.")

    def _remove_stale_staging(self) -> None:
        """Staging folders of killed runs (their pid is gone) are ours to remove."""
        parent = self.path.parent
        if not parent.is_dir():
            return
        for stale in parent.glob(f".{self.path.name}.tmp-*"):
            pid = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)) and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                logger.info("Removed %s, left behind by an interrupted run (process %s).", stale, pid)

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh hidden folder beside the output; removed whatever happens unless it was published."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(_STAGING.format(name=self.path.name, pid=os.getpid(),
                                                      token=uuid.uuid4().hex[:8]))
        staging.mkdir()
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish(self, staging: Path, manifest: dict | None = None) -> Path:
        """Write the manifest into the staging folder, then move it into place (replacing only with --force)."""
        if manifest is not None:
            write_json(staging / MANIFEST_NAME, manifest)
        self.check_replaceable()
        out = self.path
        if out.exists() or out.is_symlink():
            trash = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
            out.rename(trash)
            staging.rename(out)
            if trash.is_dir() and not trash.is_symlink():
                shutil.rmtree(trash)
            else:
                trash.unlink()
        else:
            staging.rename(out)
        return out


def claim_run_folder(out: Path, *, resumes: bool, force: bool, refusal: str,
                     inputs: Iterable[str | Path | None] = (), option: str = "--out") -> None:
    """A sweep's or study's folder: never over an input; new, empty or the same run's (resumed); another's is replaced
    only with --force."""
    refuse_overlap(out, inputs, option)
    if out.is_dir() and any(out.iterdir()) and not resumes:
        if not force:
            raise DebiasError(refusal)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write beside the target, then rename over it: a reader never sees half a file, a failure leaves none."""
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_json(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# Descriptions, not content: mergekit's README names the (staging) folder it was written in.
_NOT_CONTENT = (MANIFEST_NAME, "README.md")


def content_hash(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents; manifest and README excluded)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in _NOT_CONTENT):
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def manifest(stage: str, *, options: dict, inputs: dict[str, str | Path | None], results: dict,
             timings: dict | None = None, hash_inputs: bool = True) -> dict:
    """The one manifest schema: stage, options, inputs with content hashes, versions, timings, results."""
    sources = {role: Path(given).expanduser().resolve() for role, given in inputs.items() if given is not None}
    described = {role: {"path": str(source), "sha256": content_hash(source) if hash_inputs else None}
                 for role, source in sources.items()}
    return {"schema": MANIFEST_SCHEMA, "stage": stage, "options": options, "inputs": described,
            "results": results, "timings": timings or {}, "packages": package_versions(),
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def read_manifest(folder: str | Path) -> dict:
    from debias_plugin.data._io import json_document

    return json_document(Path(folder) / MANIFEST_NAME)
