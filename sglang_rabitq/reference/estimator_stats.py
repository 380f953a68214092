"""Error statistics of the estimator over random rotations (shared by the tests and eval/)."""

from __future__ import annotations

import math

import torch

from sglang_rabitq.reference.codes import code_values, encode_keys, quantize_query, random_rotation

ALPHA = math.sqrt(2 / math.pi)  # E <o_bar, o> for a random unit o


def rabitq_error_bound(dim: int, cosine: float) -> float:
    """Predicted std of ``(est - <q,k>) / (|q| |k|)`` for an unquantized query (RaBitQ Thm 3.2)."""
    return math.sqrt(1 - cosine**2) * math.sqrt((1 - ALPHA**2) / (dim - 1)) / ALPHA


def pair_with_cosine(dim: int, cosine: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random key and a query at the given cosine to it (norms 3 and 2: nothing assumes unit vectors)."""
    k = torch.randn(dim, generator=gen, dtype=torch.float64)
    k = k / k.norm()
    e = torch.randn(dim, generator=gen, dtype=torch.float64)
    e = e - (e @ k) * k
    e = e / e.norm()
    q = cosine * k + math.sqrt(1 - cosine**2) * e
    return q * 2.0, k * 3.0


def estimator_errors(dim: int, cosine: float, rounding: str, trials: int, seed: int = 0,
                     key_bits: int = 1) -> torch.Tensor:
    """Errors in cosine units over ``trials`` random rotations. ``rounding="none"`` skips INT4;
    ``key_bits``: bits per dimension of the key codes.

    Each trial is one rotation, treated as one "head" so all trials run as one batch.
    """
    gen = torch.Generator().manual_seed(seed)
    q, k = pair_with_cosine(dim, cosine, gen)
    rots = random_rotation(dim, seed=seed + 1, num_heads=trials)  # [T, D, D]
    codes, factor = encode_keys(k.expand(1, trials, dim).to(torch.float32), rots, bits=key_bits)
    signs = code_values(codes[0], dim)  # [T, D]: +-1 for one bit, the odd grid values for more
    if rounding == "none":
        q_bar = torch.einsum("d,tde->te", q, rots.to(torch.float64))
    else:
        qb = q.to(torch.float32).expand(1, trials, dim).contiguous()
        noise = torch.rand(qb.shape, generator=gen) if rounding == "random" else None
        q_u, delta, qmin = quantize_query(qb, rots, rounding=rounding, noise=noise)
        q_bar = delta[0, :, None].double() * q_u[0].double() + qmin[0, :, None].double()
    est = factor[0].double() * (signs * q_bar).sum(-1)
    return (est - float(q @ k)) / (q.norm() * k.norm())
