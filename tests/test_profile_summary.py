"""The decode-step profile summary (eval/profile_decode.py) on hand-made torch.profiler traces."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval.profile_decode import busy_time, kernel_name, load_trace, summarize  # noqa: E402


def test_busy_time_is_the_union_of_intervals():
    assert busy_time([]) == 0
    assert busy_time([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert busy_time([(30, 40), (0, 10)]) == 20


def test_kernel_names_drop_templates_and_arguments():
    assert kernel_name("void flashinfer::BatchDecodeKernel<true, 128u>(Params)") == "flashinfer::BatchDecodeKernel"
    assert kernel_name("_score_kernel") == "_score_kernel"
    assert kernel_name("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn") == "ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_tn"


def test_summary_per_step(tmp_path):
    ev = [
        # two steps, 100 us apart: kernels on two streams overlap in step 0
        {"ph": "X", "cat": "kernel", "name": "a<1>(x)", "ts": 0, "dur": 30},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 10, "dur": 30},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 50, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "a<2>(y)", "ts": 100, "dur": 30},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 170, "dur": 30},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0, "dur": 6},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernel", "ts": 95, "dur": 4},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 97, "dur": 2},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 120, "dur": 70, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 999, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 110, "dur": 90, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 110, "dur": 90, "tid": 2},  # another thread
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 5},  # not a complete event: ignored
    ]
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    s = summarize(load_trace(path), steps=2, top=2)
    assert s["wall_us_per_step"] == 100  # GPU span 0..200
    assert s["gpu_busy_us_per_step"] == (40 + 10 + 30 + 30) / 2
    assert s["gpu_busy_fraction"] == 110 / 200
    assert s["kernels_per_step"] == 2.5 and s["kernel_us_per_step"] == 65
    assert s["graph_launches_per_step"] == 0.5 and s["kernel_launches_per_step"] == 1
    assert s["host_launch_us_per_step"] == 6
    assert s["syncs_per_step"] == 0.5 and s["sync_us_per_step"] == 35
    assert s["syncs_by_op"] == {"aten::item": 1}  # the innermost op of the sync's own thread
    assert [k["name"] for k in s["top_kernels"]] == ["a", "b"]
    assert s["top_kernels"][0] == {"name": "a", "us_per_step": 30, "calls_per_step": 1}
    assert summarize([], steps=3)["error"]
