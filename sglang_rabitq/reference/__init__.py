"""Plain-torch ground truth for every kernel: readable, fp32/fp64, no Triton.

Layouts follow SGLang: keys live in the KV pool as ``[num_slots, H_kv, D]`` and a request's
tokens are reached through its row of ``req_to_token`` (position -> slot).
"""

from sglang_rabitq.reference.attention import dense_decode_attention, sparse_decode_attention
from sglang_rabitq.reference.codes import (
    KEY_BITS,
    code_values,
    encode_keys,
    estimate_float,
    estimate_int,
    pack_bits,
    quantize_query,
    query_nibble_table,
    random_rotation,
    rotate,
    unpack_bits,
    unpack_levels,
)
from sglang_rabitq.reference.decode import DecodeRegions, decode_regions, rabitq_decode
from sglang_rabitq.reference.select import (
    BIN_WIDTH,
    HIST_BINS,
    SMALL_BIN,
    hist_threshold,
    top_p_mask,
    top_p_mask_hist,
    union_cap_mask,
    union_cap_thresholds,
)

__all__ = [
    "DecodeRegions",
    "BIN_WIDTH",
    "HIST_BINS",
    "SMALL_BIN",
    "decode_regions",
    "dense_decode_attention",
    "KEY_BITS",
    "code_values",
    "encode_keys",
    "estimate_float",
    "estimate_int",
    "hist_threshold",
    "pack_bits",
    "quantize_query",
    "query_nibble_table",
    "rabitq_decode",
    "random_rotation",
    "rotate",
    "sparse_decode_attention",
    "top_p_mask",
    "top_p_mask_hist",
    "union_cap_mask",
    "union_cap_thresholds",
    "unpack_bits",
    "unpack_levels",
]
