"""The property-based suite (tests/properties.py, hypothesis) in its own process: every public op
against its float64 reference on drawn shapes, dtypes and values, hostile ones included. (The
hostile numbers it grew from are regression tests with their op families, tests/ops/.)"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
# CI's bounded run: a fixed seed and an example count that fits its time (a longer run is the
# same script with a larger --examples; its totals are in benchmarks/RESULTS.md).
CI_EXAMPLES, CI_SEED = 500, 0


def test_the_property_suite_passes_in_its_own_process():
    pytest.importorskip("hypothesis")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "properties.py"), "--examples", str(CI_EXAMPLES),
                           "--seed", str(CI_SEED)], capture_output=True, text=True, timeout=1800, cwd="/")
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-6000:], proc.stderr[-3000:])
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith(" passed, 0 failed") and "cases tried" in lines[-2], proc.stdout[-2000:]
    assert int(lines[-2].split()[0]) >= CI_EXAMPLES * 6
