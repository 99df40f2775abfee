"""The one atomic write of the package: checkpoints, exported weights and converted models are
written to a temporary beside their path and renamed over it, so a crash leaves the old file or
the new one, never a torn one."""

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, write) -> None:
    """``write(tmp)`` into a temporary ``<name>.*.tmp`` beside ``path``, fsync, then rename it over
    ``path``: a crash at any moment leaves the old file or the new one, never a torn one (and
    at most a temporary, which ``remove_stale_temporaries`` clears). The one atomic write of
    checkpoints and exported weights."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(path: Path) -> list:
    """Delete the ``<name>.*.tmp`` files that a process killed inside ``save`` left beside
    ``path`` (call it only while holding the run's lock); returns the names removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(path.name + ".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp.name)
    return removed
