"""RaBitQ codes: rotation, 1- to 4-bit key codes, INT4 queries and the unbiased inner-product estimate.

Conventions (one for keys and queries alike, tested): a vector ``x`` of head ``h`` is rotated as
``x @ P[h]``, i.e. ``P^T x`` for column vectors, with ``P[h]`` a random orthogonal ``D x D`` matrix.
Bit ``d`` of a code lives in int32 word ``d // 32`` at bit position ``d % 32``; a code of several bits
per dimension is that many such bit-planes, one after another.
"""

from __future__ import annotations

import torch

from sglang_rabitq.validation import check_head_dim, check_same_device

QUERY_LEVELS = 15  # INT4: q_u in [0, 15]


def random_rotation(dim: int, seed: int, num_heads: int = 1) -> torch.Tensor:
    """``[num_heads, dim, dim]`` float32 random orthogonal matrices, one per head, from ``seed``.

    QR of a Gaussian matrix with the columns' signs fixed by ``diag(R)`` gives a Haar-distributed
    rotation. Built on the CPU in float64 so every process and device gets the same matrices.
    """
    check_head_dim(dim)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    mats = []
    for _ in range(num_heads):
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        mats.append(q * torch.sign(torch.diagonal(r)).unsqueeze(0))
    return torch.stack(mats).to(torch.float32)


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., H, D]`` with per-head ``rot [H, D, D]``: ``x[..., h, :] @ rot[h]``."""
    return torch.einsum("...hd,hde->...he", x, rot.to(x.dtype))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``bits [..., D]`` (bool) -> ``[..., D // 32]`` int32 words, bit d at word d//32, position d%32."""
    d = bits.shape[-1]
    check_head_dim(d)
    b = bits.to(torch.int64).reshape(*bits.shape[:-1], d // 32, 32)
    words = (b << torch.arange(32, device=bits.device, dtype=torch.int64)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``[..., W]`` int32 -> ``[..., 32 W]`` int64 in {0, 1}."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32)


def encode_keys(
    keys: torch.Tensor, rot: torch.Tensor, center: torch.Tensor | None = None, bits: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``keys [N, H, D]`` into ``codes [N, H, bits * D/32] int32`` and ``factor [N, H] float32``.

    With ``k_c = k - center`` and ``o = P^T k_c``, a key's code is ``bits`` bits per dimension: levels
    ``u`` in ``[0, 2^bits)``, stored as bit-planes (plane ``j``, bit ``j`` of every level, in words
    ``j * D/32 .. (j + 1) * D/32 - 1``), standing for the odd grid values ``y = 2u - (2^bits - 1)``.
    The estimate is ``<q, k_c> ~= g <y, P^T q>`` with ``g = ||o||^2 / <y, o>`` (exact for ``q = k_c``;
    0 for a zero key, whose estimate is then 0).

    One bit: ``y = 2b - 1`` with ``b = [o > 0]`` and ``g = ||k_c||^2 / sum|o|`` (RaBitQ). More bits
    (extended RaBitQ): ``y`` is ``o`` on a uniform grid, ``y / 2 = clamp(floor(t o), -2^(bits-1),
    2^(bits-1) - 1) + 1/2``, at the one of ``LEVEL_SCALES`` grid scales ``t`` whose ``y`` is closest in
    angle to ``o``. Each bit about halves the estimate's error (tested).
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [N, H, D], got shape {tuple(keys.shape)}")
    n, h, d = keys.shape
    check_head_dim(d)
    check_key_bits(bits)
    if rot.shape != (h, d, d):
        raise ValueError(f"rotation must be [{h}, {d}, {d}], got {tuple(rot.shape)}")
    check_same_device(keys=keys, rot=rot, center=center)
    kc = keys.to(torch.float64)
    if center is not None:
        if center.shape != (h, d):
            raise ValueError(f"center must be [{h}, {d}], got {tuple(center.shape)}")
        kc = kc - center.to(torch.float64)
    o = rotate(kc, rot.to(torch.float64))
    if bits == 1:
        levels = (o > 0).to(torch.int64)
    else:
        levels = grid_levels(o, bits)
    y = (2 * levels - (2**bits - 1)).to(torch.float64)
    dot = (y * o).sum(-1)
    norm_sq = (kc * kc).sum(-1)
    factor = torch.where(dot > 0, norm_sq / dot.clamp_min(1e-300), torch.zeros_like(dot))
    return pack_levels(levels, bits), factor.to(torch.float32)


# each bit costs D/8 bytes per token and kv-head, and 4 already cut the 1-bit error ~8x; the score pass's
# 16-bit sums (at most 15 (2^bits - 1) D) would overflow from 6 bits at D 128
KEY_BITS = (1, 2, 3, 4)
LEVEL_SCALES = 64  # grid scales tried per key


def check_key_bits(bits: int) -> None:
    if bits not in KEY_BITS:
        raise ValueError(f"key bits must be one of {KEY_BITS}, got {bits}")


def key_bits_of(words: torch.Tensor, head_dim: int) -> int:
    """Bits per dimension of packed codes ``[..., bits * D/32]``: what every kernel and this module read
    the bits from."""
    bits, rest = divmod(words.shape[-1], head_dim // 32)
    if rest or bits not in KEY_BITS:
        raise ValueError(f"codes of {words.shape[-1]} words do not hold {KEY_BITS} bits per dimension at head dim "
                         f"{head_dim}")
    return bits


def level_scales(bits: int, device=None) -> torch.Tensor:
    """The grid scales tried, times ``2^(bits-1) / max|o|``: from the largest coordinate on the top
    level to clipping ~60 % of it (the grid's angle to Gaussian-like coordinates peaks in between)."""
    return torch.linspace(0.5, 2.5, LEVEL_SCALES, dtype=torch.float64, device=device) * 2 ** (bits - 1)


def grid_levels(o: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels ``[..., D]`` in ``[0, 2^bits)`` of rotated keys ``o [..., D]`` (see ``encode_keys``); the
    first scale of the best angle wins a tie."""
    half = 2 ** (bits - 1)
    amax = o.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 1.0 / amax.clamp_min(1e-300), torch.zeros_like(amax))
    best_cos = torch.full(o.shape[:-1], -2.0, dtype=o.dtype, device=o.device)
    best = torch.zeros(o.shape, dtype=torch.int64, device=o.device)
    for t in level_scales(bits, o.device):
        u = torch.clamp(torch.floor(o * (t * inv)), -half, half - 1) + half  # in [0, 2^bits)
        y = 2 * u - (2 * half - 1)
        cos = (y * o).sum(-1) / y.norm(dim=-1)  # ||o|| is common to every scale
        take = cos > best_cos
        best_cos = torch.where(take, cos, best_cos)
        best = torch.where(take[..., None], u.to(torch.int64), best)
    return best


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Levels ``[..., D]`` -> ``[..., bits * D/32]`` int32: bit-plane ``j`` in words ``j * D/32 ..``."""
    return torch.cat([pack_bits(((levels >> j) & 1).bool()) for j in range(bits)], dim=-1)


def unpack_levels(words: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_levels`: ``[..., bits * D/32]`` -> levels ``[..., D]`` int64."""
    w = head_dim // 32
    return sum(unpack_bits(words[..., j * w : (j + 1) * w]) << j for j in range(key_bits_of(words, head_dim)))


def code_values(words: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The odd grid values ``y = 2u - (2^bits - 1)`` (float64) of packed codes; ``+-1`` for one bit."""
    top = 2 ** key_bits_of(words, head_dim) - 1
    return (2 * unpack_levels(words, head_dim) - top).to(torch.float64)


def quantize_query(
    q: torch.Tensor, rot: torch.Tensor, rounding: str = "nearest", noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate ``q [B, Hq, D]`` by its kv-head's rotation and quantize it to INT4 per (token, head).

    ``rot [Hkv, D, D]``; query head ``h`` uses ``rot[h // (Hq // Hkv)]``. Min-max quantization:
    ``delta = (max - min) / 15``, ``q_u = round((q' - min) / delta)``. ``rounding="random"``
    rounds up with probability equal to the fractional part (exactly unbiased); ``noise`` (uniform in
    [0, 1), same shape as ``q``) makes it reproducible. Returns ``q_u [B, Hq, D] int32`` and
    ``delta, qmin [B, Hq] float32``.
    """
    if rounding not in ("nearest", "random"):
        raise ValueError(f"rounding must be 'nearest' or 'random', got {rounding!r}")
    b, hq, d = q.shape
    hkv = rot.shape[0]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    check_same_device(q=q, rot=rot, noise=noise)
    rq = rotate(q.to(torch.float32), rot.repeat_interleave(hq // hkv, dim=0))
    qmin = rq.amin(-1)
    delta = (rq.amax(-1) - qmin) / QUERY_LEVELS
    scaled = (rq - qmin[..., None]) / torch.where(delta > 0, delta, 1.0)[..., None]
    if rounding == "nearest":
        q_u = torch.floor(scaled + 0.5)
    else:
        if noise is None:
            noise = torch.rand_like(scaled)
        q_u = torch.floor(scaled + noise)
    q_u = q_u.clamp(0, QUERY_LEVELS).to(torch.int32)
    return q_u, delta, qmin


def query_nibble_table(q_u: torch.Tensor, group: int) -> torch.Tensor:
    """INT4 queries ``q_u [B, Hq, D]`` as the lookup table the score kernel reads:
    ``[B, Hq // group, D // 4, 16, ceil(group / 4)]`` int32. Entry ``[b, h, p, n]`` holds, for each
    query head ``g`` of kv-head ``h``'s group, ``sum_i bit_i(n) q_u[4p + i]`` (at most 60) in byte
    ``g % 4`` of word ``g // 4`` (unused bytes 0). So ``<b, q_u>`` is the sum over a code's ``D / 4``
    nibbles ``n_p`` of entry ``[p, n_p]``: one load per nibble for every head of the group at once,
    where bit-planes cost 4 AND + 4 popcount per 32 dims and head."""
    bsz, hq, d = q_u.shape
    if hq % group or not 1 <= group <= 8:
        raise ValueError(f"{hq} query heads do not split into groups of 1-8 heads of {group}")
    qi = q_u.to(torch.int64).view(bsz, hq // group, group, d // 4, 4)
    nbits = (torch.arange(16)[:, None] >> torch.arange(4)[None, :]) & 1  # [16, 4]
    sums = torch.einsum("bhgpi,ni->bhpng", qi, nbits.to(qi.device))  # [B, Hkv, D/4, 16, group]
    lanes = torch.zeros(*sums.shape[:-1], 4 * ((group + 3) // 4), dtype=torch.int64, device=q_u.device)
    lanes[..., :group] = sums
    lanes = lanes.view(*sums.shape[:-1], -1, 4) << (8 * torch.arange(4, device=q_u.device))
    return lanes.sum(-1).to(torch.int32)  # < 2^31: the top byte is at most 60


def estimate_int(
    codes: torch.Tensor, factor: torch.Tensor, q_u: torch.Tensor, delta: torch.Tensor, qmin: torch.Tensor
) -> torch.Tensor:
    """Integer-form estimate of ``<q, k_c>`` for codes ``[N, bits * D/32]`` and one query head.

    With levels ``u`` (one bit: ``u = b``), ``<y, q_bar> = 2 delta <u, q_u> + 2 min sum(u) -
    (2^bits - 1)(delta sum(q_u) + D min)``; ``<u, q_u> = sum_j 2^j <plane_j, q_u>``, each plane's term
    the sum of ``q_u`` over its set bits. ``q_u [D]`` int, ``delta``/``qmin`` scalars. Returns ``[N]``
    float64.
    """
    d = q_u.shape[-1]
    levels = unpack_levels(codes, d)  # [N, D]
    top = 2 ** key_bits_of(codes, d) - 1
    qi = q_u.to(torch.int64)
    u_dot_q = (levels * qi).sum(-1)
    delta = delta.to(torch.float64)
    qmin = qmin.to(torch.float64)
    ip = 2 * delta * u_dot_q + 2 * qmin * levels.sum(-1) - top * (delta * qi.sum() + d * qmin)
    return factor.to(torch.float64) * ip


def estimate_float(codes: torch.Tensor, factor: torch.Tensor, q_bar: torch.Tensor) -> torch.Tensor:
    """Float-form estimate ``g * <y, q_bar>`` (``q_bar [D]`` the rotated, dequantized query)."""
    return factor.to(torch.float64) * (code_values(codes, q_bar.shape[-1]) @ q_bar.to(torch.float64))
