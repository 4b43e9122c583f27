"""A local copy of the upstream hosts for tests and CI: every registry file under <host>/<path of its URL>."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from debias_plugin.datafiles import FILES


def build_mirror(data_dir: Path, out: Path) -> Path:
    """Lay `data_dir` (shared/data's layout) out as the mirror that $DEBIAS_DATA_MIRROR points at."""
    for file in FILES.values():
        if file.url is None or not (data_dir / file.name).is_file():
            continue
        parts = urlsplit(file.url)
        target = out / parts.netloc / parts.path.lstrip("/")
        if file.member:
            target = target / file.member
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_dir / file.name, target)
    return out


if __name__ == "__main__":  # python tests/data_mirror.py DATA_DIR OUT  (used by .ci/run)
    print(build_mirror(Path(sys.argv[1]), Path(sys.argv[2])))
