"""Argument checks shared by the reference, the kernels and the backend: fail early, say why."""

from __future__ import annotations

import torch


def check_head_dim(dim: int) -> None:
    if dim <= 0 or dim % 32:
        raise ValueError(
            f"head_dim must be a positive multiple of 32 (codes pack 32 sign bits per int32 word), got {dim}"
        )


def check_fraction(**values: float) -> None:
    """Each value in (0, 1]: top-p mass, budget fractions."""
    for name, v in values.items():
        if not (0.0 < float(v) <= 1.0):
            raise ValueError(f"{name} must be in (0, 1], got {v}")


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_non_negative(**values: int) -> None:
    for name, v in values.items():
        if int(v) != v or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"tensors must share one dtype, got {dtypes}")
