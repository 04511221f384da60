"""The C kernels under AddressSanitizer and UndefinedBehaviorSanitizer (tests/kernel_harness.c): every entry point on
buffers of exactly the size it may touch, each path this CPU has against a scalar reference, and the refusals."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("gcc") is None,
                                reason="the kernels are x86-64 code built with gcc")


def test_every_path_is_exact_and_in_bounds_under_the_sanitizers(tmp_path):
    harness = tmp_path / "harness"
    subprocess.run(["gcc", "-DSC_STANDALONE", "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-pthread", str(ROOT / "tests/kernel_harness.c"),
                    str(ROOT / "appliance/kernels/prompt_kernels.c"), "-lm", "-o", str(harness)], check=True, timeout=120)
    run = subprocess.run([str(harness)], capture_output=True, text=True, timeout=120)
    print(run.stdout)  # which paths ran, which were skipped and why
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Sanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] in ("avx2: ok", "avx2: skipped, this CPU has no AVX2/FMA")
    assert lines[1] in ("avx512vnni: ok", "avx512vnni: skipped, this CPU has no AVX-512 VNNI")
    if lines[0] == "avx2: ok":  # the logits, LayerNorm, cache writes, GELU, attention and a recorded decode step
        assert lines[2:] == ["logits: ok", "decode step: ok"]

