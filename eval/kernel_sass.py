"""Instruction mix of a decode kernel's loops, compiled for an NVIDIA GPU on any machine (no GPU needed):
Triton lowers the kernel for the given architecture, its bundled ptxas and nvdisasm give the SASS,
and every loop (a label up to its backward branch) is summarized by opcode.

    python eval/kernel_sass.py --kernel score --num-warps 2
    python eval/kernel_sass.py --kernel attention --group 4 --head-dim 128
    python eval/kernel_sass.py --kernel encode --resources     # registers, spills, shared memory

``--resources`` adds what ptxas reports for the whole kernel: registers per thread, bytes spilled to
local memory, and the shared memory Triton asked for (both limit how many programs an SM holds).
``--stores`` lists the kernel's global stores by SASS opcode, i.e. by width.

Arguments that SGLang's pools make multiples of 16 elements (pointers, most strides) are compiled as
such, as Triton's runtime specialization does; ``--not-aligned`` names those that are not (by default
the strides of the kv-head-major code buffers that depend on the pool's size, and the code row's
D / 32 words). The factors' slot stride, 1 in that layout, is compiled as the constant 1, as Triton
specializes it.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sglang_rabitq.kernels.decode import CHUNK_ALIGN, DecodePlan
from sglang_rabitq.kernels.encode import ENCODE_BLOCK_D, ENCODE_BLOCK_N, _encode_kernel, _encode_layers_kernel
from sglang_rabitq.kernels.plan import _plan_kernel, plan_constexprs
from sglang_rabitq.kernels.query import PRIOR_BLOCK, _prepare_query_kernel
from sglang_rabitq.kernels.estimate import table_words
from sglang_rabitq.kernels.estimate_mma import MMA_ROUNDS
from sglang_rabitq.kernels.score import HIST_BLOCK_N, SCORE_BLOCK_N, SLOTS_AHEAD, _score_kernel, score_max_registers
from sglang_rabitq.kernels.select import _threshold_kernel, threshold_constexprs
from sglang_rabitq.kernels.sparse_attention import (
    SELECT_BLOCK_N, _merge_kernel, _sparse_attention_kernel, attention_launch, merge_constexprs)
from sglang_rabitq.reference.select import BIN_WIDTH, HIST_BINS

KERNELS = ("score", "attention", "encode", "encode_layers", "query", "query_head", "threshold", "merge", "plan")

POINTER_TYPES = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "logit_ptr": "*fp16", "qscal_ptr": "*fp32",
                 "factor_ptr": "*fp32", "thr_ptr": "*fp32", "po_ptr": "*fp32", "plse_ptr": "*fp32", "cmax_ptr": "*fp32",
                 "rot_ptr": "*fp32", "center_ptr": "*fp32", "out_ptr": "*bf16", "slot_ptr": "*i64",
                 # the planner's: SGLang's req_pool_indices and seq_lens are int64, the pool flags bool (as int8)
                 "rpi_ptr": "*i64", "seq_ptr": "*i64", "valid_ptr": "*i8", "slots_ptr": "*i64", "totals_ptr": "*i64",
                 "seed_ptr": "*i64", "prior_ptr": "*fp32",
                 "key_table_ptr": "*i64"}  # the layers' key buffers, as addresses


def kernel_spec(name: str, group: int, head_dim: int, num_chunks: int = 128, num_warps: int = 4, mma: bool = True,
                key_bits: int = 1):
    """The kernel and the constexprs its launcher gives it (``num_chunks``: chunks per request;
    ``mma``: the score pass's estimate on the tensor cores, else the nibble table; ``key_bits``: bits
    per dimension of the key codes)."""
    gp = triton.next_power_of_2(group)
    if name == "score":
        consts = dict(GROUP=group, GP=gp, D=head_dim, BLOCK_N=SCORE_BLOCK_N, HBLOCK=HIST_BLOCK_N, NB=HIST_BINS,
                      BIN_W=BIN_WIDTH, PLAN_FIELDS=6, WPE=table_words(group), HW=True, MMA=mma,
                      W=num_warps, R=MMA_ROUNDS, AHEAD=SLOTS_AHEAD, BALLOT_HIST=True, OFFS32=True, KEY_BITS=key_bits,
                      PDL=True)
        return _score_kernel, consts
    if name == "attention":
        launch = attention_launch(group, head_dim)
        consts = dict(GROUP=group, GP=gp, D=head_dim, BLOCK_N=launch["block_n"], SEL_N=SELECT_BLOCK_N, DENSE=False,
                      PLAN_FIELDS=6, DOT_F32=False, OFFS32=True, PDL=True)
        return _sparse_attention_kernel, consts
    if name == "encode":
        return _encode_kernel, dict(D=head_dim, BLOCK_N=ENCODE_BLOCK_N, BLOCK_D=ENCODE_BLOCK_D, KEY_BITS=key_bits)
    if name == "encode_layers":  # bf16 keys
        return _encode_layers_kernel, dict(K_DTYPE=tl.bfloat16, D=head_dim, BLOCK_N=ENCODE_BLOCK_N, BLOCK_D=ENCODE_BLOCK_D,
                                           KEY_BITS=key_bits)
    if name in ("query", "query_head"):
        # with the sink/window mass of top-p over the context and the lazy encode at the default chunk;
        # a group a program ("query", query_heads_per_program at large batches) or one head
        hpp = group if name == "query" else 1
        return _prepare_query_kernel, dict(HQ=32, GROUP=group, D=head_dim, WPE=table_words(group), RANDOM=False, PRIOR=True, PLAN_FIELDS=6,
                                           BLOCK_K=PRIOR_BLOCK, CHUNK=64, ENC_N=ENCODE_BLOCK_N, ENC_D=ENCODE_BLOCK_D,
                                           KEY_BITS=key_bits, HPP=hpp, HPP_P=triton.next_power_of_2(hpp))
    if name == "threshold":
        return _threshold_kernel, {**threshold_constexprs(num_chunks), "PRIOR": True, "PDL": True}
    if name == "merge":  # the chunks' partials and the sink/window program's
        return _merge_kernel, {**merge_constexprs(num_chunks + 1, head_dim), "PDL": True}
    if name == "plan":  # at the default --rabitq-encode-chunk
        return _plan_kernel, plan_constexprs(64, CHUNK_ALIGN, DecodePlan.FIELDS, mutate=True)
    raise ValueError(f"unknown kernel {name!r}")


UNIT_STRIDES = {"stride_fn": 1}  # code_buffers: a kv-head's factors are contiguous over slots


def compile_kernel(fn, consts: dict, num_warps: int, arch: int, not_aligned: set[str], maxnreg: int | None = None):
    names = fn.arg_names
    consts = {**{k: v for k, v in UNIT_STRIDES.items() if k in names}, **consts}
    if "PDL" in consts:  # the chained launch's griddepcontrol exists from sm_90 (kernels.launch_chain)
        consts["PDL"] = arch >= 90
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = POINTER_TYPES.get(n, "*i32")
        elif n in ("sm_scale", "score_scale", "prior_scale", "top_p"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if (sig[n].startswith("*") or n.startswith("stride")) and n not in not_aligned}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "maxnreg": maxnreg})


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def sass(compiled) -> str:
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"{compiled.metadata.name}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    return subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True, text=True).stdout


def resources(compiled) -> dict:
    """Registers per thread and bytes spilled (ptxas -v on the kernel's PTX), shared memory in bytes."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    ptx = tmp / f"{compiled.metadata.name}.ptx"
    ptx.write_text(compiled.asm["ptx"])
    arch = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)  # sm_90a: what Triton targets
    log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", str(ptx), "-o", str(ptx.with_suffix(".o"))],
                         check=True, capture_output=True, text=True)
    text = log.stdout + log.stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "shared": int(compiled.metadata.shared)}


def loops(sass: str):
    """(first line, last line, opcode counts) of every loop: a label up to a branch back to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i - 1:  # (not the one-line end-of-kernel trap loop)
            ops = collections.Counter(
                o.group(1) for o in (re.search(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", x)
                                     for x in lines[labels[m.group(1)]:i + 1]) if o)
            yield labels[m.group(1)], i, ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernel", choices=KERNELS, default="score")
    ap.add_argument("--group", type=int, default=4, help="query heads per kv-head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap (default: the launcher's)")
    ap.add_argument("--not-aligned", default="stride_cn,stride_ch,stride_fh")
    ap.add_argument("--num-chunks", type=int, default=128, help="chunks per request (threshold and merge kernels)")
    ap.add_argument("--top", type=int, default=12, help="opcodes shown per loop")
    ap.add_argument("--resources", action="store_true", help="also print registers, spills and shared memory")
    ap.add_argument("--table", action="store_true", help="score: the nibble-table estimate instead of the tensor cores'")
    ap.add_argument("--stores", action="store_true", help="also print the kernel's global stores by width")
    ap.add_argument("--key-bits", type=int, default=1, help="bits per dimension of the key codes (--rabitq-key-bits)")
    args = ap.parse_args()
    fn, consts = kernel_spec(args.kernel, args.group, args.head_dim, args.num_chunks, args.num_warps, not args.table,
                             args.key_bits)
    maxnreg = args.maxnreg or (score_max_registers(args.group) if args.kernel == "score" else None)
    compiled = compile_kernel(fn, consts, args.num_warps, args.arch, set(filter(None, args.not_aligned.split(","))),
                              maxnreg)
    if args.resources:
        r = resources(compiled)
        print(f"{args.kernel}: {r['registers']} registers per thread, {r['spill_stores']} B spill stores, "
              f"{r['spill_loads']} B spill loads, {r['shared']} B shared memory ({args.num_warps} warps)")
    code = sass(compiled)
    if args.stores:
        widths = collections.Counter(re.findall(r"\b(STG\.E(?:\.[A-Z0-9]+)*)", code))
        print("stores: " + ", ".join(f"{n} {op}" for op, n in sorted(widths.items())))
    for first, last, ops in loops(code):
        top = ", ".join(f"{n} {op}" for op, n in ops.most_common(args.top))
        print(f"loop at SASS lines {first}-{last}: {sum(ops.values())} instructions: {top}")


if __name__ == "__main__":
    main()
