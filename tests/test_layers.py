"""The package's layering (``[tool.importlinter]`` in pyproject.toml): every module imports only
from the layers below its own, imports inside functions included, and no package's modules
import each other in a cycle. A change that breaks either goes red here."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    # From the checkout's root, so that the contract is checked on the source folder itself.
    proc = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout
