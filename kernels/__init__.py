"""Triton kernels of RaBitQ decode, each beside its plain-torch reference in sglang_rabitq.reference.

Installed as ``sglang_rabitq.kernels``. One decode step of one layer runs:
``prepare_query`` (rotate + INT4 + nibble table, and the lazy encode of keys that left the window) ->
``score_chunks`` (estimate once, fp16 logits to the workspace, chunk max + histogram) ->
``top_p_threshold`` (per query head) [-> ``cap_union`` with ``--rabitq-max-budget``] -> ``sparse_attention`` (select, compact, exact attention, split
over chunks) -> ``merge_partials``; from sm_90 on, each kernel after the query's is launched as a
programmatic dependent of the one before (``launch_chain``). ``encode_slots_all_layers`` writes the codes of a forward batch's
new keys for every sparse layer in one launch (at prefill, and for a decode step that attends
densely); ``encode_slots`` one layer's.
``plan_decode`` plans each decode batch (once, before the layers run) in one launch.

Integer arguments that change from batch to batch (batch size, chunk count, slot count) are marked
``do_not_specialize``: Triton otherwise compiles one variant per value class (1, a multiple of 16,
other), so the first batch of each new class waited for a compile in the middle of serving (the plan
kernel runs outside the CUDA graphs at every decode step; ``tests/test_compile_once.py``).
"""

from sglang_rabitq.kernels.decode import DecodePlan, DecodeWorkspace, rabitq_decode_layer
from sglang_rabitq.kernels.encode import code_buffers, encode_slots, encode_slots_all_layers, key_pointers
from sglang_rabitq.kernels.plan import plan_decode
from sglang_rabitq.kernels.query import prepare_query
from sglang_rabitq.kernels.score import score_chunks
from sglang_rabitq.kernels.select import cap_union, top_p_threshold
from sglang_rabitq.kernels.sparse_attention import merge_partials, sparse_attention

__all__ = [
    "DecodePlan",
    "DecodeWorkspace",
    "cap_union",
    "code_buffers",
    "encode_slots",
    "encode_slots_all_layers",
    "key_pointers",
    "merge_partials",
    "plan_decode",
    "prepare_query",
    "rabitq_decode_layer",
    "score_chunks",
    "sparse_attention",
    "top_p_threshold",
]
