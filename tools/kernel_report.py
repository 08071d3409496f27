"""What the Triton compiler makes of the attention kernels, without a GPU.

    python tools/kernel_report.py                          # tiles in use, head_dim 128, sm_90
    python tools/kernel_report.py --head-dim 64
    python tools/kernel_report.py --kernel dkdv --tile 32 64 4 3     # any tile: block_m block_n warps stages
    python tools/kernel_report.py --kernel fwd --tile 128 128 8 3 --tma
    python tools/kernel_report.py --kernel dkdv --schedule   # order of MMAs and waits per loop
    python tools/kernel_report.py --kernel gluon_fwd --schedule   # the Gluon (warp-specialised) forward
    python tools/kernel_report.py --kernel keep_probs keep_bwd dcp_fwd dcp_dkdv dcp_dq dcp_dkeep
                                  # learned context pruning's keep mask and attention (tiles in use)

Compiles each kernel for the target (ptxas ships with Triton, so a CPU machine will do),
with the argument specialisation a real launch gets at long sequences (pointers and
integers divisible by 16), and prints per kernel: registers per thread, bytes of stack
(spilled registers), shared memory, how many CTAs of it fit on one SM, how many tile loads
inside loops the software pipeliner made asynchronous (cp.async or TMA) and how many stayed
synchronous, the warpgroup MMAs in loops and the waits among them that stop a warpgroup
until every MMA in flight is done (`pendings = 0`); with --schedule also each inner loop's
order of tile waits, MMAs, MMA waits, exponentials and sums. These explain most of what
the profiler shows (see docs/kernel_notes.md); they are not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from megatron_fox.ops.forgetting_attn import triton_bwd, triton_fwd  # noqa: E402
from megatron_fox.ops.forgetting_attn.tiles import Tile, kernel_config  # noqa: E402

KERNELS = {"fwd": triton_fwd.fwd_kernel, "dkdv": triton_bwd.dkdv_kernel, "dq": triton_bwd.dq_kernel}
_FLOAT_POINTERS = {"CQ", "CK", "LSE", "ROW", "DLT", "DCOL", "DROW"}
_INT_POINTERS = {"START", "END", "DOCSTART", "DOCEND"}
_OUTPUTS = {"O", "DQ", "DK", "DV"}  # same dtype as q
_TILE_INPUTS = {"Q": "block_m", "K": "block_n", "V": "block_n", "DO": "block_m"}
_FLOAT_SCALARS = {"qk_scale", "sm_scale"}

# Per-SM limits of Hopper (sm_90): 64K 32-bit registers allocated per warp in units of 256,
# 228 KB of shared memory of which each CTA also takes 1 KB, 2048 threads, 32 CTAs.
_SM90 = dict(regs=65536, reg_unit=256, smem=233472, smem_per_cta=1024, threads=2048, ctas=32)


def ctas_per_sm(regs: int, num_warps: int, smem: int, limits: dict = _SM90) -> int:
    """CTAs of a kernel that fit on one SM at once, from its registers per thread, warps and
    shared memory (bytes)."""
    per_warp = -(-regs * 32 // limits["reg_unit"]) * limits["reg_unit"]
    by_regs = limits["regs"] // (per_warp * num_warps)
    by_smem = limits["smem"] // (smem + limits["smem_per_cta"])
    by_threads = limits["threads"] // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, limits["ctas"])


def compile_kernel(name: str, tile: Tile, head_dim: int = 128, dtype: str = "bf16", arch: int = 90):
    """Compile one kernel (fwd, dkdv, dq) for sm_<arch>: causal, no packed documents, no GQA."""
    fn = KERNELS[name]
    const = dict(GROUP=1, HEAD_DIM=head_dim, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, VARLEN=False,
                 DOT_PREC="tf32", CAUSAL=True, TMA=tile.tma)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in const:
            signature[arg] = "constexpr"
            continue
        if arg in _TILE_INPUTS and tile.tma:
            rows = getattr(tile, _TILE_INPUTS[arg])
            signature[arg] = f"tensordesc<{dtype}[1,{rows},1,{head_dim}]>"
            continue
        if arg == "CK" and tile.tma and name != "dkdv":  # key prefix sums: [B*H, T] descriptor
            signature[arg] = f"tensordesc<fp32[1,{tile.block_n}]>"
            continue
        if arg in _TILE_INPUTS or arg in _OUTPUTS:
            signature[arg] = "*" + dtype
        elif arg in _FLOAT_POINTERS:
            signature[arg] = "*fp32"
        elif arg in _INT_POINTERS:
            signature[arg] = "*i32"
        elif arg in _FLOAT_SCALARS:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"  # lengths, head counts, strides
        attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs = {(fn.arg_names.index(k),): v for k, v in const.items()}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))


# learned context pruning (ops/context_pruning): the keep mask's two tile kernels that evaluate
# the sparse sigmoid, and the attention under the mask
CONTEXT_PRUNING = ("keep_probs", "keep_bwd", "dcp_fwd", "dcp_dkdv", "dcp_dq", "dcp_dkeep")


def context_pruning_tile(name: str) -> Tile:
    """The tile a context-pruning kernel launches with (keep_mask._BLOCK / _WARPS, function._CONFIG)."""
    import importlib

    if name.startswith("keep_"):
        mask = importlib.import_module("megatron_fox.ops.context_pruning.keep_mask")  # the module, not the op
        return Tile(mask._BLOCK, mask._BLOCK, mask._WARPS[name[5:]], 3)
    from megatron_fox.ops.context_pruning.function import _CONFIG

    return Tile(*_CONFIG[name[4:]])


def compile_context_pruning(name: str, tile: Tile, head_dim: int = 128, r: int = 64, dtype: str = "bf16",
                            arch: int = 90):
    """Compile a context-pruning kernel for sm_<arch>: the keep mask's at interaction dim r
    (sparse sigmoid with Newton steps, alpha >= 2), the attention's with ACP's block bounds,
    no packed documents."""
    from megatron_fox.ops.context_pruning import keep_mask_triton, triton_kernels
    from megatron_fox.ops.context_pruning.keep_mask import _STEPS_NEWTON

    if name.startswith("keep_"):
        fn = getattr(keep_mask_triton, name + "_kernel")
        const = dict(R=r, BM=tile.block_m, BN=tile.block_n, MODE=keep_mask_triton.SPARSE, STEPS=_STEPS_NEWTON,
                     NEWTON=True)
        kinds = {"T": "i32", "inv_sqrt_r": "fp32", "a": "fp32"}  # every other argument a float32 pointer
    else:
        fn = getattr(triton_kernels, "pruned_" + {"fwd": "fwd", "dkdv": "bwd_dkdv", "dq": "bwd_dq",
                                                   "dkeep": "bwd_dkeep"}[name[4:]] + "_kernel")
        const = dict(D=head_dim, BM=tile.block_m, BN=tile.block_n, HAS_DOC=False, DOT_PREC="tf32", BOUNDED=True)
        kinds = {a: "*" + dtype for a in ("Q", "K", "V", "DO", "OUT", "DQ", "DK", "DV")}
        kinds.update(DOC="*i32", BOUND="*i32", sm_scale="fp32",
                     **{a: "i32" for a in fn.arg_names if a.startswith("s_") or a in ("T", "H", "GROUP")})
    signature = {a: "constexpr" if a in const else kinds.get(a, "*fp32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in const and signature[a] != "fp32"}
    constexprs = {(fn.arg_names.index(k),): v for k, v in const.items()}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))


def compile_gluon_forward(head_dim: int = 128, dtype: str = "bf16", arch: int = 90):
    """Compile the Gluon forward (gluon_fwd.py) with the tile the op uses for this head_dim."""
    import triton.experimental.gluon.language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from megatron_fox.ops.forgetting_attn import gluon_fwd

    block_m, block_n, stages = gluon_fwd.TILES[head_dim]
    elem = {"bf16": (torch.bfloat16, gl.bfloat16), "fp16": (torch.float16, gl.float16)}[dtype]
    shaped = torch.empty(1, 256, 1, head_dim, dtype=elem[0])  # stands in for q/k/v: only dtype and strides count
    rows = torch.empty(1, 256)

    def desc(t, block, gdt):
        layout = gl.NVMMASharedLayout.get_default_for(block, gdt)
        return mangle_type(TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout))

    fn = gluon_fwd.gluon_fwd_kernel
    const = dict(GROUP=1, BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=stages)
    descs = dict(q_desc=desc(shaped, [1, block_m // 2, 1, head_dim], elem[1]),
                 k_desc=desc(shaped, [1, block_n, 1, head_dim], elem[1]),
                 v_desc=desc(shaped, [1, block_n, 1, head_dim], elem[1]),
                 c_desc=desc(rows, [1, block_n], gl.float32))
    pointers = dict(CQ="*fp32", LSE="*fp32", START="*i32", OUT="*" + dtype)
    signature = {a: "constexpr" if a in const else descs.get(a) or pointers.get(a)
                 or ("fp32" if a == "qk_scale" else "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in pointers}
    constexprs = {(fn.arg_names.index(k),): v for k, v in const.items()}
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, maxnreg=168))


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes) of the one kernel in a cubin, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(regs), int(stack)


def _inner_loops(ir: str) -> list[list[str]]:
    """The lines of each innermost scf.for body of the IR, in program order (regions open
    on a line ending in '{' and close on a line starting with '}'; an else branch counts
    as part of its if). The kernels compiled here (GROUP = 1) have no nested loops, so
    these are all their loops."""
    out, stack = [], []  # stack entries: [is_for, lines, has_inner_for]
    for line in ir.splitlines():
        text = line.split(" loc(")[0].strip()
        if text.startswith("}") and text.endswith("{"):  # "} else {": the same region goes on
            continue
        if text.startswith("}"):
            if stack:
                is_for, lines, inner = stack.pop()
                if is_for and not inner:
                    out.append(lines)
            continue
        if stack:
            stack[-1][1].append(text)
        if text.endswith("{"):
            is_for = "scf.for" in text
            if is_for:
                for entry in stack:
                    entry[2] = entry[2] or entry[0]
            stack.append([is_for, [], False])
    return out


def _event(text: str):
    """What one IR line does for `loop_schedules`, or None."""
    if "ttng.warp_group_dot " in text:
        return "mma" if re.search(r"warp_group_dot [^,]+, [^,]+, %cst", text) else "mma+="
    if "warp_group_dot_wait" in text:
        return "wait(" + re.search(r"pendings = (\d+)", text).group(1) + ")"
    if re.search(r"math\.exp2 .*tensor<\d+x\d+x", text):
        return "exp2"
    if '"tt.reduce"' in text:
        return "sum"
    if "ttg.async_wait" in text or "ttng.wait_barrier" in text:
        return "tiles"
    return None


def loop_schedules(ir: str) -> list[str]:
    """Per innermost loop of the IR, in program order, what a warpgroup does each iteration:
    `tiles` (waits for its pipelined tile loads), `mma` (a fresh product), `mma+=` (one that
    accumulates into a loop-carried value and may stay in flight), `wait(n)` (waits until at
    most n MMAs are in flight), `exp2` (a tile of exponentials), `sum` (a reduction)."""
    return [", ".join(e for e in map(_event, body) if e) for body in _inner_loops(ir)]


def report(compiled, tile: Tile) -> dict:
    """Registers, spills, shared memory, CTAs/SM, pipelined loads and MMA waits of a compiled kernel."""
    regs, stack = _resources(compiled.asm["cubin"])
    ir = compiled.asm["ttgir"]
    loops = "\n".join(line for body in _inner_loops(ir) for line in body)
    smem = compiled.metadata.shared
    return dict(
        regs=regs, stack_bytes=stack, smem_bytes=smem, ctas_per_sm=ctas_per_sm(regs, tile.num_warps, smem),
        async_tile_loads=len(re.findall(r"async_copy_global_to_local .*x\d+x(?:bf16|f16|f32)", loops))
        + len(re.findall(r"async_tma_copy_global_to_local", loops)),
        sync_tile_loads=len(re.findall(r"= tt\.load .*: tensor<\d+x\d+x!tt\.ptr<(?:bf16|f16|f32)>", loops))
        + len(re.findall(r"= tt\.descriptor_load", loops)),
        mmas=len(re.findall(r"ttng\.warp_group_dot ", loops)),
        waits_all=len(re.findall(r"warp_group_dot_wait .*pendings = 0", loops)),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", choices=[*KERNELS, "gluon_fwd", *CONTEXT_PRUNING], nargs="+", default=list(KERNELS))
    p.add_argument("--tile", type=int, nargs=4, metavar=("BLOCK_M", "BLOCK_N", "WARPS", "STAGES"), default=None,
                   help="tile to compile (default: the one the op uses for this head_dim)")
    p.add_argument("--tma", action="store_true", help="with --tile: TMA descriptor loads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel")
    p.add_argument("--schedule", action="store_true", help="also print each inner loop's MMA/wait order")
    args = p.parse_args(argv)
    if args.arch != 90:
        p.error("--arch: only 90 (Hopper) has its per-SM limits here")
    config = kernel_config(args.head_dim, torch.device("cuda"))
    for name in args.kernel:
        if name == "gluon_fwd":
            from megatron_fox.ops.forgetting_attn.gluon_fwd import TILES

            if args.head_dim not in TILES:
                p.error(f"--head-dim: the Gluon forward is built for head_dim {sorted(TILES)}")
            block_m, block_n, stages = TILES[args.head_dim]
            tile = Tile(block_m, block_n, 4, stages, tma=True)
            compiled = compile_gluon_forward(args.head_dim, arch=args.arch)
            row = dict(kernel=name, tile=tile.__dict__, head_dim=args.head_dim, **report(compiled, tile),
                       partition_regs=sorted({int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)",
                                                                       compiled.asm["ptx"])}))
        elif name in CONTEXT_PRUNING:
            tile = Tile(*args.tile) if args.tile else context_pruning_tile(name)
            compiled = compile_context_pruning(name, tile, args.head_dim, arch=args.arch)
            row = dict(kernel=name, tile=tile.__dict__, head_dim=args.head_dim, **report(compiled, tile))
        else:
            tile = Tile(*args.tile, tma=args.tma) if args.tile else getattr(config, name)
            compiled = compile_kernel(name, tile, args.head_dim, arch=args.arch)
            row = dict(kernel=name, tile=tile.__dict__, head_dim=args.head_dim, **report(compiled, tile))
        if args.schedule:
            row["loops"] = loop_schedules(compiled.asm["ttgir"])
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            t = row.pop("tile")
            print(f"{name:5s} tile {t['block_m']}x{t['block_n']} warps {t['num_warps']} stages {t['num_stages']}"
                  f"{' tma' if t['tma'] else ''}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                                             if k not in ("kernel", "head_dim", "loops")), flush=True)
            for i, loop in enumerate(row.get("loops", [])):
                print(f"      loop {i + 1}: {loop}")


if __name__ == "__main__":
    main()
