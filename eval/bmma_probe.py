"""Throughput of the 1-bit tensor-core MMA (``mma.sync ... .b1 .and.popc``, SASS BMMA) against the
popcount instruction on this GPU: what the score pass's estimate can run on.

    python3 eval/bmma_probe.py

Each thread of 8 programs per SM runs 8 independent MMAs (or 16 popcounts) per loop iteration;
reported per SM and second, and as AND-popcounted bits per second for the whole GPU.
"""

import torch
import triton
import triton.language as tl


def _asm(k: int, n_mma: int) -> str:
    """``n_mma`` independent BMMAs of shape m16n8k``k`` on the same operands, summed into $0."""
    a = ", ".join(["$1"] * (4 if k == 256 else 2))
    b = ", ".join(["$2"] * (2 if k == 256 else 1))
    regs = [[f"c{4 * m + i}" for i in range(4)] for m in range(n_mma)]
    lines = [f".reg .b32 c<{4 * n_mma}>;"] + [f"mov.b32 c{i}, {i};" for i in range(4 * n_mma)]
    for cs in regs:
        acc = ", ".join(cs)
        lines.append(f"mma.sync.aligned.m16n8k{k}.row.col.s32.b1.b1.s32.and.popc {{{acc}}}, {{{a}}}, {{{b}}}, {{{acc}}};")
    lines.append("add.s32 $0, c0, c1;")
    lines += [f"add.s32 $0, $0, c{i};" for i in range(2, 4 * n_mma)]
    return "{\n" + "\n".join(lines) + "\n}"


@triton.jit
def _bmma_kernel(x_ptr, out_ptr, N, ASM: tl.constexpr, W: tl.constexpr):
    offs = tl.program_id(0) * 32 * W + tl.arange(0, 32 * W)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros_like(x)
    for i in range(N):
        acc += tl.inline_asm_elementwise(ASM, "=r,r,r", [x ^ i, x + i], dtype=tl.int32, is_pure=True, pack=1)
    tl.store(out_ptr + offs, acc)


@triton.jit
def _popc_kernel(x_ptr, out_ptr, N, W: tl.constexpr):
    offs = tl.program_id(0) * 32 * W + tl.arange(0, 32 * W)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros_like(x)
    for i in range(N):
        y = x ^ i
        for j in tl.static_range(16):
            acc += tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [y + j], dtype=tl.int32, is_pure=True, pack=1)
    tl.store(out_ptr + offs, acc)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    W, progs, N = 4, sms * 8, 2000
    x = torch.randint(0, 2**31 - 1, (progs * 32 * W,), dtype=torch.int32, device="cuda")
    out = torch.empty_like(x)
    for k, nm in ((128, 8), (256, 8)):
        asm = _asm(k, nm)
        f = lambda: _bmma_kernel[(progs,)](x, out, N, ASM=asm, W=W, num_warps=W)
        ms = triton.testing.do_bench(f, warmup=50, rep=300)
        warp_mmas = progs * W * N * nm
        print(f"BMMA m16n8k{k}: {ms*1e3:.1f} us, {warp_mmas / (ms*1e-3) / sms / 1e9:.2f} G warp-mma/s/SM, "
              f"{warp_mmas * 16 * 8 * k / (ms*1e-3) / 1e12:.0f} T bit-and-popc/s", flush=True)
    f = lambda: _popc_kernel[(progs,)](x, out, N, W=W, num_warps=W)
    ms = triton.testing.do_bench(f, warmup=50, rep=300)
    pops = progs * W * 32 * N * 16
    print(f"POPC: {ms*1e3:.1f} us, {pops / (ms*1e-3) / sms / 1e9:.1f} G popc/s/SM, {pops * 32 / (ms*1e-3) / 1e12:.0f} T bit/s")


if __name__ == "__main__":
    main()
