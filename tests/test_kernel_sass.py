"""The kernels compiled for an H100 (sm_90) on this machine: the score kernel's estimate loop runs on the
hardware popcount and without shared-memory round trips (a layout conversion or barrier there costs
more than the estimate itself), its histogram counts by warp ballots, not shared memory, and no kernel
spills registers to local memory."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_rabitq.kernels.estimate_mma import MMA_ROUNDS

ROOT = Path(__file__).resolve().parent.parent
KERNEL_WARPS = {"score": 2, "attention": 4, "encode": 4, "encode_layers": 4, "query": 4, "query_head": 4, "threshold": 4, "merge": 4, "plan": 4}  # as launched


def kernel_sass(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    return subprocess.run([sys.executable, str(ROOT / "eval" / "kernel_sass.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600, check=True).stdout


def loop_opcodes(out: str) -> list[dict]:
    counts = []
    for line in out.splitlines():
        if line.startswith("loop"):
            ops = dict(reversed(item.split()) for item in line.split(": ", 2)[2].split(", "))
            counts.append({op: int(n) for op, n in ops.items()})
    return counts


def test_score_estimate_loop_loads_one_table_entry_per_nibble_without_barriers():
    out = kernel_sass("--kernel", "score", "--num-warps", "2", "--top", "100", "--table")
    estimate = next(ops for ops in loop_opcodes(out) if "STG" in ops)  # the loop that stores the logits
    # 2 tokens per thread at 2 warps (D 128), each: 32 nibble entries, 4 code words, its slot and
    # factor; popcounts of the code words only
    assert estimate["LDG"] == 2 * (32 + 4 + 2)
    assert estimate["POPC"] == 2 * 4
    assert not {"BAR", "STS", "LDS"} & estimate.keys()


def test_score_histogram_loop_counts_by_ballots_in_one_load_per_thread():
    out = kernel_sass("--kernel", "score", "--num-warps", "2", "--top", "100")
    hist = next(ops for ops in loop_opcodes(out) if "VOTE" in ops)  # the first head's walk (its fallback follows)
    # 8 logits per thread of a 512-logit block at 2 warps, loaded at once: 7 ballots each (6 bin bits
    # and "in range"), 2 popcounts (the lane's two bins), no shared memory
    assert hist["LDG"] == 1
    assert hist["VOTE"] == 8 * 7
    assert hist["POPC"] == 8 * 2
    assert not {"BAR", "STS", "LDS", "ATOMS"} & hist.keys()


@pytest.mark.parametrize("group,head_dim,key_bits", [(1, 64, 1), (4, 128, 1), (6, 128, 1), (7, 64, 1), (8, 128, 1),
                                                   (4, 128, 2), (6, 128, 3)])
def test_score_tensor_core_loop_runs_one_mma_per_two_heads_and_plane(group, head_dim, key_bits):
    # one element per thread of the lane tensors (kernels.estimate_mma): a thread holding two would
    # run each MMA twice, with operands of the wrong lanes
    out = kernel_sass("--kernel", "score", "--num-warps", "4", "--head-dim", str(head_dim), "--group", str(group),
                      "--key-bits", str(key_bits), "--top", "100")
    estimate = next(ops for ops in loop_opcodes(out) if "BMMA" in ops)
    assert estimate["BMMA"] == (group + 1) // 2 * key_bits * MMA_ROUNDS
    # per thread and 16 tokens of its warp: 2 slots, a code word of each row and plane, the factor of its token
    assert estimate["LDG"] == (3 + 2 * key_bits) * MMA_ROUNDS
    assert estimate["STG"] == (group + 1) // 2 * MMA_ROUNDS  # a logit per head pair
    assert "POPC" in estimate and not {"BAR", "STS", "LDS"} & estimate.keys()


@pytest.mark.parametrize("group", [1, 2, 4, 7])
@pytest.mark.parametrize("kernel", ["query", "query_head"])  # a group or one head a program
def test_query_kernel_writes_the_nibble_table_byte_by_byte(group, kernel):
    # each head owns one byte of an entry: a wider store writes a neighbour's byte and skips an entry
    # (seen with one head a group: entries' bytes paired into 16-bit stores, odd entries unwritten)
    out = kernel_sass("--kernel", kernel, "--num-warps", "4", "--head-dim", "64", "--group", str(group), "--stores")
    stores = dict(reversed(item.split()) for item in out.splitlines()[0].removeprefix("stores: ").split(", "))
    assert int(stores.get("STG.E.U8", 0)) > 0
    assert not {"STG.E.U16", "STG.E.64", "STG.E.128"} & stores.keys()


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel", sorted(KERNEL_WARPS))
def test_kernels_compile_without_register_spills(kernel, head_dim):
    group = 7 if head_dim == 64 else 4  # Qwen2.5-0.5B and Llama-3.1-8B shapes
    assert_no_spills(kernel, head_dim, group, KERNEL_WARPS[kernel])


@pytest.mark.parametrize("group, head_dim, num_warps", [(8, 64, 2), (6, 128, 4), (8, 128, 4)])
def test_score_register_cap_spills_nothing_at_larger_groups(group, head_dim, num_warps):
    assert_no_spills("score", head_dim, group, num_warps)  # (num_warps: score_num_warps')


@pytest.mark.parametrize("key_bits", [2, 4])
def test_score_tensor_core_estimate_of_several_planes_spills_nothing(key_bits):
    assert_no_spills("score", 128, 4, 4, key_bits)  # Llama-3.1-8B shape, every plane's words of 4 tiles held


def assert_no_spills(kernel, head_dim, group, num_warps, key_bits=1):
    out = kernel_sass("--kernel", kernel, "--num-warps", str(num_warps), "--head-dim", str(head_dim),
                      "--group", str(group), "--key-bits", str(key_bits), "--resources", "--top", "1")
    m = re.search(r"(\d+) registers per thread, (\d+) B spill stores, (\d+) B spill loads", out)
    assert m and int(m.group(2)) == 0 and int(m.group(3)) == 0, out.splitlines()[0]
