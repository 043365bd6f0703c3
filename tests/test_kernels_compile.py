"""The Triton kernels compile for an H100 (sm_90) as the GPU would run them, on this GPU-less
machine: Triton's bundled ptxas builds them, and the report says whether a product left the
tensor cores or a tile spilled out of registers. The interpreter tests cannot see either."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiling every autotune config takes ~40 s on the dev machine

REPORT = Path(__file__).resolve().parents[1] / "bench" / "compile_report.py"
ROW = re.compile(r"^(decode|prefill)\s+(\w+)\s+(\w+)\s+.*regs\s+(\d+)\s+spills\s+(\d+) B.*wgmma (\d+)$")


def test_kernels_compile_for_sm90_on_the_tensor_cores():
    triton = pytest.importorskip("triton", reason="Triton is not installed on this platform")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists():
        pytest.skip("this Triton build has no bundled ptxas to compile for NVIDIA GPUs")
    # A process of its own: the compiler needs triton imported without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(REPORT)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert not [line for line in lines if "FAILED" in line], run.stdout
    rows = [ROW.match(line) for line in lines]
    assert all(rows), run.stdout
    seen = {(r[1], r[2]) for r in rows}
    assert seen >= {(k, e) for k in ("decode", "prefill") for e in ("dense", "int8", "int4", "bit", "lowrank")}
    for r in rows:
        kernel, encoding, dtype, _, spills, wgmma = r.groups()
        if dtype in ("bf16", "fp16"):
            assert int(wgmma) > 0, f"{kernel} {encoding} {dtype} does not use wgmma"
            assert int(spills) == 0, f"{kernel} {encoding} {dtype} spills {spills} bytes"
