"""The transformation cases (tests/transformations_cases.py: jvp, jacfwd, linearize, hessian,
vmap of grad, grad of grad against reverse mode and finite differences) in a pytest session
of their own.

Run in one process after the rest of the suite, XLA's CPU compiler crashed the whole
session with a segmentation fault at test_vmap_of_grad_equals_a_loop (twice, on fresh
clones: once while reading the persistent compilation cache, once compiling), while the
same cases pass in a fresh process. The cause is not found; a crash in the child fails
this test with the child's output instead of ending the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_every_transformation_case_passes_in_a_process_of_its_own():
    cases = Path(__file__).with_name("transformations_cases.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        capture_output=True, text=True, timeout=1800, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
