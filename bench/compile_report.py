"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU, and report what the
compiler made of them: registers, spills, shared memory, and whether the products run on wgmma.

    python bench/compile_report.py            # one config per kernel and encoding
    python bench/compile_report.py --all      # every autotune config, at every decode BLOCK_M

Each kernel is given the specialisations a real launch gets (16-byte aligned pointers, unit strides
as constants, other strides and N, K divisible by 16), since without them Triton neither vectorises
nor pipelines the loads. Needs Triton's bundled ptxas and cuobjdump, not a GPU; must run in a
process where TRITON_INTERPRET is unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # run from a bare checkout too

ENCODINGS = ("dense", "int8", "int4", "bit", "lowrank")
_UNIT_STRIDES = {"stride_xk", "stride_wk", "stride_d0b", "stride_d1b", "stride_on"}
_TRITON_TYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass
class Report:
    kernel: str
    encoding: str
    dtype: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    wgmma: int

    def row(self) -> str:
        return (f"{self.kernel:8s} {self.encoding:8s} {self.dtype:5s} {self.config:42s} regs {self.registers:3d}"
                f"  spills {self.spill_bytes:4d} B  smem {self.shared_bytes // 1024:4d} KiB  wgmma {self.wgmma}")


def _pointer_types(encoding: str, dtype: str) -> dict[str, str]:
    t = _TRITON_TYPE[dtype]
    d0 = {"dense": t, "int8": "i8", "int4": "u8", "bit": "u8", "lowrank": t}[encoding]
    d1 = t if encoding in ("dense", "lowrank") else "fp32"
    return dict(x_ptr=f"*{t}", w_ptr=f"*{t}", d0_ptr=f"*{d0}", d1_ptr=f"*{d1}", alpha_ptr="*fp32",
                bias_ptr=f"*{t}", dbias_ptr=f"*{t}", out_ptr=f"*{t}")


def _compile(fn, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs, constants = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if name not in ("M", "R"):  # the batch size is whatever it is
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _resources(compiled) -> tuple[int, int]:
    """(registers, spill bytes) from cuobjdump's resource usage of the cubin."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return int(found.group(1)), int(found.group(2))


def compile_kernel(kernel: str, encoding: str, dtype: str, config, block_m: int = 16) -> Report:
    """Compile one kernel variant (`config` a triton.Config from the kernel's autotune list)."""
    from expo_kernels import triton_decode, triton_prefill

    common = dict(DELTA=encoding, GROUP_SIZE=128 if encoding == "int4" else 0, R_BLOCK=64,
                  HAS_BIAS=True, HAS_DBIAS=True, DOT="ieee" if dtype == "fp32" else "tc")
    if kernel == "decode":
        fn = triton_decode._expo_decode_kernel
        constexprs = dict(common, SPLIT_K=1, BLOCK_M=block_m, BLOCK_N=64, **config.kwargs)
    else:
        fn = triton_prefill._expo_prefill_kernel
        constexprs = dict(common, **config.kwargs)
    compiled = _compile(fn, _pointer_types(encoding, dtype), constexprs, config.num_warps, config.num_stages)
    registers, spills = _resources(compiled)
    tiles = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
    label = " ".join(f"{k[6:]}={v}" for k, v in tiles.items()) + f" w{config.num_warps} s{config.num_stages}"
    return Report(kernel, encoding, dtype, label, registers, spills, compiled.metadata.shared,
                  compiled.asm["ptx"].count("wgmma.mma_async"))


def variants(everything: bool):
    """(kernel, encoding, dtype, config, block_m) to compile."""
    from expo_kernels import triton_decode, triton_prefill

    for encoding in ENCODINGS:
        decode_configs = triton_decode._GPU_CONFIGS if everything else triton_decode._GPU_CONFIGS[:1]
        for config in decode_configs:
            for block_m in ((16, 32, 64) if everything else (16,)):
                yield "decode", encoding, "bf16", config, block_m
        prefill_configs = triton_prefill._GPU_CONFIGS if everything else triton_prefill._GPU_CONFIGS[:1]
        for config in prefill_configs:
            yield "prefill", encoding, "bf16", config, 0
    yield "decode", "dense", "fp32", triton_decode._FP32_CONFIGS[0], 16
    yield "prefill", "dense", "fp32", triton_prefill._FP32_CONFIGS[0], 0
    yield "decode", "int4", "fp16", triton_decode._GPU_CONFIGS[0], 16
    yield "prefill", "int4", "fp16", triton_prefill._GPU_CONFIGS[0], 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every autotune config, at every decode BLOCK_M")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    for kernel, encoding, dtype, config, block_m in variants(args.all):
        try:
            print(compile_kernel(kernel, encoding, dtype, config, block_m).row(), flush=True)
        except Exception as error:  # a config that does not compile is a finding, not a crash
            print(f"{kernel:8s} {encoding:8s} {dtype:5s} BLOCK_M={block_m} {config}: FAILED {error!r:.200}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
