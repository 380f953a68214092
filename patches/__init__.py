"""SGLang plugin (entry-point group ``sglang.srt.plugins``): makes stock SGLang accept
``--attention-backend rabitq`` and the ``--rabitq-*`` flags. SGLang calls ``load`` in the launching
process, the Engine and every scheduler process; each hook lives in its own module, one reason each.
"""

import logging

logger = logging.getLogger("sglang_rabitq")


def load() -> None:
    from sglang_rabitq.patches.version import check_sglang_version

    check_sglang_version()
    from sglang_rabitq.patches import cuda_graph, memory, registry, server_args

    registry.register()
    server_args.register()
    memory.register()
    cuda_graph.register()
