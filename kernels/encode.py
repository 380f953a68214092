"""Encode keys of given KV-pool slots into codes of 1-4 bits per dimension + fused factor (reference:
``encode_keys``; the bits are the code buffer's: its last dimension holds ``bits * D / 32`` words).

``encode_block`` is the body: the kernels here run it over a slot list, for one layer
(``encode_slots``) or for every sparse layer in one launch (``encode_slots_all_layers``: a forward
batch's new keys once its last sparse layer has written them), and the query kernel runs it over each
request's lazy-encode chunk of a sparse decode step (no launch of its own).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_rabitq.reference.codes import LEVEL_SCALES, key_bits_of

ENCODE_BLOCK_N = 64  # keys per program (one lazy-encode chunk of a request at the default chunk size)
ENCODE_BLOCK_D = 16  # key dimensions per step of the rotation
ENCODE_WARPS = 4
KEY_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
SCALES = tl.constexpr(LEVEL_SCALES)


def code_buffers(num_slots: int, num_kv_heads: int, head_dim: int, device, num_layers: int | None = None,
                 bits: int = 1):
    """Zeroed codes ``[(L,) slots, H, bits * D / 32] int32`` and factors ``[(L,) slots, H] float32``, indexed by
    slot then kv-head as every kernel here takes them (through strides), stored kv-head-major: each
    kv-head's slots are contiguous, so a run of consecutive slots is one contiguous read for the score
    pass (a 16-token tile's codes: 256 B at D 128, not 16 B pieces 128 B apart at 8 kv-heads; its
    factors 64 B, not 4 B pieces 32 B apart). Score launch 235 -> 198 us on the Llama-3.1-8B shape at
    32K, batch 32 (H100, ``bench_kernels.py --breakdown``: ``score_kv_major``)."""
    lead = () if num_layers is None else (num_layers,)
    codes = torch.zeros(*lead, num_kv_heads, num_slots, bits * head_dim // 32, dtype=torch.int32, device=device)
    factor = torch.zeros(*lead, num_kv_heads, num_slots, dtype=torch.float32, device=device)
    return codes.transpose(-3, -2), factor.transpose(-2, -1)


@triton.jit
def encode_block(
    k_ptr, slots, rot_ptr, center_ptr, code_ptr, factor_ptr, h, stride_kn, stride_kh, stride_cn, stride_ch, stride_fn,
    stride_fh, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KEY_BITS: tl.constexpr,
):
    """Encode kv-head ``h`` of the keys at ``slots [BLOCK_N]`` (int64; < 0 skipped) into ``KEY_BITS``
    bit-planes."""
    valid = slots >= 0  # -1 marks padding in fixed-size (CUDA-graph) slot lists
    # a decode step's lazy-encode list is all padding on most steps: nothing to do then
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        WORDS: tl.constexpr = D // 32
        key = k_ptr + slots * stride_kn + h * stride_kh
        offs_o = tl.arange(0, D)
        norm_sq = tl.zeros((BLOCK_N,), tl.float32)
        o = tl.zeros((BLOCK_N, D), tl.float32)
        # o = (k - c) @ P (the one rotation convention), BLOCK_D rows of P at a time, in fp32 FMAs:
        # one whole-width fp32 dot unrolls into a body ptxas can only compile with heavy register spills
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            kc = tl.load(key[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            kc -= tl.load(center_ptr + h * D + offs_d)[None, :]
            norm_sq += tl.sum(kc * kc, axis=1)
            rot = tl.load(rot_ptr + h * D * D + offs_d[:, None] * D + offs_o[None, :])
            o = tl.dot(kc, rot, o, input_precision="ieee")
        if KEY_BITS == 1:
            levels = (o > 0).to(tl.int32)
        else:
            levels = grid_levels(o, KEY_BITS)
        dot = tl.sum((2 * levels - (2**KEY_BITS - 1)).to(tl.float32) * o, axis=1)  # <y, o>: sum|o| at one bit
        factor = tl.where(dot > 0, norm_sq / tl.where(dot > 0, dot, 1.0), 0.0)
        offs_w = tl.arange(0, WORDS)
        code = code_ptr + slots[:, None] * stride_cn + h * stride_ch + offs_w[None, :]
        for j in tl.static_range(KEY_BITS):
            # plane j: bit d -> word j * WORDS + d // 32, position d % 32 (distinct bits: the sum is an OR)
            bits = tl.reshape((levels >> j) & 1, (BLOCK_N, WORDS, 32))
            words = tl.sum(bits << tl.arange(0, 32)[None, None, :], axis=2)
            tl.store(code + j * WORDS, words, mask=valid[:, None])
        tl.store(factor_ptr + slots * stride_fn + h * stride_fh, factor, mask=valid)


@triton.jit
def grid_levels(o, KEY_BITS: tl.constexpr):
    """Levels ``[BLOCK_N, D]`` int32 in ``[0, 2^KEY_BITS)`` of the rotated keys ``o``: the uniform grid
    at the one of ``LEVEL_SCALES`` scales closest in angle to each key (reference: ``grid_levels``)."""
    HALF: tl.constexpr = 2 ** (KEY_BITS - 1)
    amax = tl.max(tl.abs(o), axis=1)
    inv = tl.where(amax > 0, 1.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    best_cos = tl.full(amax.shape, -2.0, tl.float32)
    best_t = tl.zeros_like(amax)
    for i in range(SCALES):
        t = (0.5 + 2.0 * i / (SCALES - 1)) * HALF
        u = tl.minimum(tl.maximum(tl.floor(o * (t * inv)[:, None]), -HALF), HALF - 1)
        y = 2.0 * u + 1.0
        cos = tl.sum(y * o, axis=1) / tl.sqrt(tl.sum(y * y, axis=1))  # ||o|| is common to every scale
        take = cos > best_cos
        best_cos = tl.where(take, cos, best_cos)
        best_t = tl.where(take, t, best_t)
    u = tl.minimum(tl.maximum(tl.floor(o * (best_t * inv)[:, None]), -HALF), HALF - 1)
    return u.to(tl.int32) + HALF


@triton.jit(do_not_specialize=["n_slots"])  # per-batch sizes: one compile (package doc)
def _encode_kernel(
    k_ptr, slot_ptr, rot_ptr, center_ptr, code_ptr, factor_ptr, n_slots,
    stride_kn, stride_kh, stride_cn, stride_ch, stride_fn, stride_fh,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KEY_BITS: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = tl.load(slot_ptr + offs_n, mask=offs_n < n_slots, other=-1).to(tl.int64)
    encode_block(k_ptr, slots, rot_ptr, center_ptr, code_ptr, factor_ptr, tl.program_id(1),
                 stride_kn, stride_kh, stride_cn, stride_ch, stride_fn, stride_fh, D, BLOCK_N, BLOCK_D, KEY_BITS)


def encode_slots(
    k_buf: torch.Tensor,
    slots: torch.Tensor,
    rot: torch.Tensor,
    center: torch.Tensor,
    codes: torch.Tensor,
    factor: torch.Tensor,
) -> None:
    """Encode ``k_buf[slots]`` (``[num_slots, H, D]``) into ``codes[slots]`` and ``factor[slots]``.

    ``slots`` is int32/int64; entries < 0 are skipped. ``rot [H, D, D]``, ``center [H, D]`` float32.
    """
    n = slots.numel()
    if n == 0:
        return
    _, h, d = k_buf.shape
    _encode_kernel[(triton.cdiv(n, ENCODE_BLOCK_N), h)](
        k_buf, slots, rot, center, codes, factor, n,
        k_buf.stride(0), k_buf.stride(1), codes.stride(0), codes.stride(1), factor.stride(0), factor.stride(1),
        D=d, BLOCK_N=ENCODE_BLOCK_N, BLOCK_D=ENCODE_BLOCK_D, KEY_BITS=key_bits_of(codes, d), num_warps=ENCODE_WARPS,
    )


@triton.jit(do_not_specialize=["n_slots"])
def _encode_layers_kernel(
    key_table_ptr, slot_ptr, rot_ptr, center_ptr, code_ptr, factor_ptr, n_slots,
    stride_kn, stride_kh, stride_cl, stride_cn, stride_ch, stride_fl, stride_fn, stride_fh,
    K_DTYPE: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KEY_BITS: tl.constexpr,
):
    layer = tl.program_id(2).to(tl.int64)  # (a layer's code buffer may pass 2^31 elements)
    heads = tl.num_programs(1)
    # the KV pool keeps a tensor per layer; torch allocations are aligned (as Triton's launcher would
    # find a tensor argument to be: vector loads of the keys)
    k_ptr = tl.multiple_of(tl.load(key_table_ptr + layer).to(tl.pointer_type(K_DTYPE)), 16)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = tl.load(slot_ptr + offs_n, mask=offs_n < n_slots, other=-1).to(tl.int64)
    encode_block(k_ptr, slots, rot_ptr + layer * heads * D * D, center_ptr + layer * heads * D,
                 code_ptr + layer * stride_cl, factor_ptr + layer * stride_fl, tl.program_id(1),
                 stride_kn, stride_kh, stride_cn, stride_ch, stride_fn, stride_fh, D, BLOCK_N, BLOCK_D, KEY_BITS)


def key_pointers(k_bufs: list[torch.Tensor]) -> torch.Tensor:
    """The device table of the layers' key buffers that ``encode_slots_all_layers`` reads (int64
    addresses; the buffers must outlive it and share shape, strides and dtype)."""
    first = k_bufs[0]
    for k in k_bufs:
        if (k.shape, k.stride(), k.dtype, k.device) != (first.shape, first.stride(), first.dtype, first.device):
            raise ValueError("every layer's key buffer must have the same shape, strides, dtype and device")
    if first.dtype not in KEY_DTYPES:
        raise ValueError(f"keys of dtype {first.dtype} cannot be encoded (supported: {', '.join(map(str, KEY_DTYPES))})")
    return torch.tensor([k.data_ptr() for k in k_bufs], dtype=torch.int64, device=first.device)


def encode_slots_all_layers(
    k_ptrs: torch.Tensor,
    k_like: torch.Tensor,
    slots: torch.Tensor,
    rot: torch.Tensor,
    center: torch.Tensor,
    codes: torch.Tensor,
    factor: torch.Tensor,
) -> None:
    """``encode_slots`` for L layers in one launch: layer ``l``'s keys at ``k_ptrs[l]`` (``key_pointers``;
    ``k_like``: one of those buffers, for shape, strides and dtype) into ``codes[l]`` and ``factor[l]``,
    with ``rot [L, H, D, D]`` and ``center [L, H, D]`` (contiguous), ``codes [L, slots, H, D/32]``,
    ``factor [L, slots, H]``."""
    n, layers = slots.numel(), k_ptrs.numel()
    if n == 0 or layers == 0:
        return
    _, h, d = k_like.shape
    if not (rot.is_contiguous() and center.is_contiguous()) or rot.shape[0] != layers or center.shape[0] != layers:
        raise ValueError(f"rot and center must be contiguous with {layers} layers")
    _encode_layers_kernel[(triton.cdiv(n, ENCODE_BLOCK_N), h, layers)](
        k_ptrs, slots, rot, center, codes, factor, n,
        k_like.stride(0), k_like.stride(1), codes.stride(0), codes.stride(1), codes.stride(2),
        factor.stride(0), factor.stride(1), factor.stride(2),
        K_DTYPE=KEY_DTYPES[k_like.dtype], D=d, BLOCK_N=ENCODE_BLOCK_N, BLOCK_D=ENCODE_BLOCK_D,
        KEY_BITS=key_bits_of(codes, d), num_warps=ENCODE_WARPS,
    )
