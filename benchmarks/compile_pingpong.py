"""Compiles litft.adapters.lora_gemm_pingpong's warp-specialized kernel for sm_90 without a GPU, one line per kind
of llama-8b call: compile seconds, registers per thread at launch, spills, shared memory, stages, and the wgmma
instructions it emitted. For developing the kernel on a CPU machine before spending GPU time (NOTES.md, section 28):
a Gluon error, a spill or a shared-memory overflow shows here. Needs the Triton the kernel is written for (3.6):

  pip install --target /tmp/triton36 --no-deps triton==3.6.0
  PYTHONPATH=/tmp/triton36:. python benchmarks/compile_pingpong.py [gated qkv_forward ...] [--ptx DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from litft.adapters import lora_gemm_pingpong as pingpong  # noqa: E402

# (rows, columns, long depths, rank-deep width, transposed, gated, backward rank): llama-8b's kinds of call at 8,192
# tokens
CASES = {
    "qkv_forward": (8192, 6144, [4096], 48, True, False, 0),
    "down_input_gradient": (8192, 14336, [4096], 16, False, False, 0),
    "down_forward": (8192, 4096, [14336], 16, True, False, 0),
    "gate_up_input_gradient": (8192, 4096, [14336, 14336], 32, False, False, 0),
    "gated": (8192, 14336, [4096], 32, True, True, 0),
    "gated_input_gradient": (8192, 14336, [4096], 16, False, False, 16),
}


def descriptor_type(block: list[int]) -> str:
    """The signature string of a bf16 Gluon tensor descriptor with `block` (what the launcher would derive)."""
    return f"tensordesc<bf16{list(block)},{pingpong._layout(block, torch.bfloat16)!r}>".replace(" ", "")


def compile_case(rows, columns, depths, rank, transposed, gated, backward_rank):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    low_k = pingpong.rank_block(rank)
    constants = pingpong.launch_arguments(rows, columns, depths, low_k, transposed, gated, programs=132,
                                          backward_rank=backward_rank)
    block_m, block_n, block_k = pingpong.BLOCK_M, pingpong.BLOCK_N, pingpong.BLOCK_K
    if gated:
        half = block_n // 2
        out = descriptor_type([block_m, half])
        b, low_b = descriptor_type([2, half, block_k]), descriptor_type([2, half, low_k])
    else:
        out = descriptor_type([block_m, block_n])
        b = descriptor_type([block_n, block_k] if transposed else [block_k, block_n])
        low_b = descriptor_type([block_n, low_k] if transposed else [low_k, block_n])
    a, low_a = descriptor_type([block_m, block_k]), descriptor_type([block_m, low_k])
    signature = dict(c=out, gate_out=out, up_out=out, product_out=out, rows="i32", a0=a, b0=b, a1=a, b1=b, a2=a,
                     b2=b, low_a=low_a, low_b=low_b)
    backward = ["gate", "up", "grad_low", "grad_gate", "grad_up", "partials", "gate_stride", "up_stride"]
    if backward_rank:
        signature.update(dict(zip(backward, ["*bf16"] * 5 + ["*fp32", "i32", "i32"])))
    else:
        signature.update(dict.fromkeys(backward, "constexpr"))
    signature.update(dict.fromkeys(constants, "constexpr"))
    names = list(signature)
    values = {**({} if backward_rank else dict(zip(backward, pingpong._NO_BACKWARD))), **constants}
    source = GluonASTSource(pingpong._kernel(), signature,
                            constexprs={(names.index(name),): value for name, value in values.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)), constants


def ptxas_report(ptx: str) -> str:
    """ptxas's register and spill line for the kernel (the ptxas that ships with Triton)."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(source), "-o",
                                 str(Path(folder) / "kernel.cubin")], capture_output=True, text=True)
    lines = [line.split("info    : ")[-1].strip() for line in result.stderr.splitlines()
             if "registers" in line or "spill" in line]
    return "; ".join(lines) or result.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (all by default)")
    parser.add_argument("--ptx", default=None, help="a folder to write each case's PTX into")
    args = parser.parse_args()
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}: expected some of {', '.join(CASES)}")
    for name in args.cases or CASES:
        start = time.time()
        compiled, constants = compile_case(*CASES[name])
        ptx = compiled.asm["ptx"]
        wgmmas = sorted(set(re.findall(r"wgmma\.mma_async\.\S+", ptx)))
        print(f"{name}: {time.time() - start:.1f} s, shared {compiled.metadata.shared} bytes, "
              f"{constants['STAGES']} stages, {ptxas_report(ptx)}, {', '.join(wgmmas)}", flush=True)
        if args.ptx:
            Path(args.ptx).mkdir(parents=True, exist_ok=True)
            (Path(args.ptx) / f"{name}.ptx").write_text(ptx)


if __name__ == "__main__":
    main()
