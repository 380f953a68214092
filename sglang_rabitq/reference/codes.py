"""RaBitQ codes: rotation, 1-bit key codes, INT4 queries and the unbiased inner-product estimate.

Conventions (one for keys and queries alike, tested): a vector ``x`` of head ``h`` is rotated as
``x @ P[h]``, i.e. ``P^T x`` for column vectors, with ``P[h]`` a random orthogonal ``D x D`` matrix.
Bit ``d`` of a code lives in int32 word ``d // 32`` at bit position ``d % 32``.
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
    keys: torch.Tensor, rot: torch.Tensor, center: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode ``keys [N, H, D]`` into ``codes [N, H, D/32] int32`` and ``factor [N, H] float32``.

    With ``k_c = k - center`` and ``o = P^T k_c``: bits are ``o > 0`` and the fused factor is
    ``g = ||k_c|| / alpha`` with ``alpha = <2b-1, o/||k_c||> = sum|o| / ||k_c||``, i.e.
    ``g = ||k_c||^2 / sum|o|`` (0 for a zero key, whose estimate is then 0).
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [N, H, D], got shape {tuple(keys.shape)}")
    n, h, d = keys.shape
    check_head_dim(d)
    if rot.shape != (h, d, d):
        raise ValueError(f"rotation must be [{h}, {d}, {d}], got {tuple(rot.shape)}")
    check_same_device(keys=keys, rot=rot, center=center)
    kc = keys.to(torch.float64)
    if center is not None:
        if center.shape != (h, d):
            raise ValueError(f"center must be [{h}, {d}], got {tuple(center.shape)}")
        kc = kc - center.to(torch.float64)
    o = rotate(kc, rot.to(torch.float64))
    norm_sq = (kc * kc).sum(-1)
    l1 = o.abs().sum(-1)
    factor = torch.where(l1 > 0, norm_sq / l1.clamp_min(1e-300), torch.zeros_like(l1))
    return pack_bits(o > 0), factor.to(torch.float32)


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
    """Integer-form estimate of ``<q, k_c>`` for codes ``[N, D/32]`` and one query head.

    ``<2b-1, q_bar> = 2 delta <b, q_u> + 2 min popcount(b) - delta sum(q_u) - D min``, where
    ``<b, q_u>`` is the sum of ``q_u`` over the set bits of ``b``.
    ``q_u [D]`` int, ``delta``/``qmin`` scalars. Returns ``[N]`` float64.
    """
    d = q_u.shape[-1]
    bits = unpack_bits(codes)  # [N, D] in {0, 1}
    qi = q_u.to(torch.int64)
    b_dot_q = (bits.to(torch.int64) * qi).sum(-1)
    popcount = bits.sum(-1)
    delta = delta.to(torch.float64)
    qmin = qmin.to(torch.float64)
    ip = 2 * delta * b_dot_q + 2 * qmin * popcount - delta * qi.sum() - d * qmin
    return factor.to(torch.float64) * ip


def estimate_float(codes: torch.Tensor, factor: torch.Tensor, q_bar: torch.Tensor) -> torch.Tensor:
    """Float-form estimate ``g * <2b - 1, q_bar>`` (``q_bar`` the rotated, dequantized query)."""
    signs = unpack_bits(codes).to(torch.float64) * 2 - 1
    return factor.to(torch.float64) * (signs @ q_bar.to(torch.float64))
