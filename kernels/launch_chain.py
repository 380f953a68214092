"""Programmatic dependent launch of a decode step's kernels (sm_90 on).

A sparse layer is a chain of small launches (query, score, threshold, [cap,] attention, merge), each
waiting for the one before. Launched with programmatic stream serialization (Triton's ``launch_pdl``),
a kernel after the first may be dispatched once every program of the kernel before has exited, before
that grid is retired; it then waits at ``griddepcontrol.wait`` (``chain_start``, its first statement)
until the kernel before has completed and its stores are visible. Nothing of a kernel runs before that
wait, so the results are those of plain launches, bit for bit. Under CUDA graphs the dependency is
captured as a programmatic edge.

No kernel releases its dependents early (``griddepcontrol.launch_dependents``): on an H100, each
kernel releasing the next at its start made the step 12-17 % slower at batch 1, 32K
(ab_step-launch-chain-early-trigger-*-h100.md), where the wait alone gains 1-6 % at batch 1 and
~1 % at larger batches (ab_step-launch-chain-*-h100.md). The query kernel, first of the chain,
follows SGLang's kernels and is launched plainly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from sglang_rabitq.kernels.estimate import compiled_for

ENABLED = True  # False: plain launches (tests compare the two)
MIN_CAPABILITY = (9, 0)  # griddepcontrol: Hopper on


def programmatic_launch(device: torch.device) -> bool:
    """Whether the decode kernels on ``device`` launch as a programmatic chain: compiled on a GPU of
    ``MIN_CAPABILITY`` or newer, and ``ENABLED``."""
    return ENABLED and compiled_for(device, MIN_CAPABILITY)


def chain_options(device: torch.device) -> dict:
    """The launch arguments of a chained kernel: its ``PDL`` constexpr and Triton's ``launch_pdl``."""
    pdl = programmatic_launch(device)
    return dict(PDL=pdl, launch_pdl=pdl)


@triton.jit
def chain_start(PDL: tl.constexpr):
    """First statement of a chained kernel: wait until the kernel before has finished, its stores
    visible (a no-op where the kernel was launched plainly)."""
    if PDL:
        gdc_wait()
