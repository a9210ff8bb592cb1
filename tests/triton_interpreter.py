"""Triton kernels tested on the CPU: a test module's `interp_` tests run in one fresh process with
TRITON_INTERPRET=1.

Triton picks interpreter or compiler when `triton.language` and each `@triton.jit` are first
imported, so the variable must be set before any module of the process touches triton; a
subprocess is the one way that holds whatever other test modules imported first."""
import os
import subprocess
import sys

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interp_only = pytest.mark.skipif(not INTERPRETING, reason="run by test_triton_interpreter_subprocess")


def run_interpreter_tests(test_file: str) -> None:
    """Run `test_file`'s `interp_` tests under the interpreter; fail with their output."""
    if INTERPRETING:
        pytest.skip("already inside the interpreter run")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                          "-k", "interp_", test_file], env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout, run.stdout[-2000:]
