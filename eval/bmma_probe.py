"""Throughput of the binary tensor-core MMA (BMMA, and.popc) vs POPC on this GPU (probe)."""
import sys
import torch
import triton
import triton.language as tl


def _asm(k: int, n_mma: int) -> str:
    na = 4 if k == 256 else 2
    nb = 2 if k == 256 else 1
    a = ",".join(f"$1" for _ in range(na))
    b = ",".join(f"$2" for _ in range(nb))
    body = "{\n.reg .b32 c<%d>;\n" % (4 * n_mma)
    for m in range(n_mma):
        cs = ",".join(f"c{4*m+i}" for i in range(4))
        body += f"mma.sync.aligned.m16n8k{k}.row.col.s32.b1.b1.s32.and.popc {{{cs}}}, {{{a}}}, {{{b}}}, {{0,0,0,0}};\n" if False else \
            f"mma.sync.aligned.m16n8k{k}.row.col.s32.b1.b1.s32.and.popc {{{cs}}}, {{{a}}}, {{{b}}}, {{c{4*m},c{4*m+1},c{4*m+2},c{4*m+3}}};\n"
    init = "".join(f"mov.b32 c{i}, {i};\n" for i in range(4 * n_mma))
    tail = "add.s32 $0, c0, c1;\n" + "".join(f"add.s32 $0, $0, c{i};\n" for i in range(2, 4 * n_mma))
    return body.replace("{\n.reg .b32 c<%d>;\n" % (4 * n_mma), "{\n.reg .b32 c<%d>;\n" % (4 * n_mma) + init) + tail + "}"


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
    clk = 1.755e9  # H100 SXM boost; reported only as a ratio
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
