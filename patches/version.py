"""Refuse to patch an SGLang release whose internals were not checked."""

import sglang

from sglang_rabitq import SUPPORTED_SGLANG


def check_sglang_version() -> None:
    if sglang.__version__ != SUPPORTED_SGLANG:
        raise RuntimeError(
            f"sglang-rabitq supports sglang=={SUPPORTED_SGLANG}, found {sglang.__version__}: "
            f"install it with `pip install sglang=={SUPPORTED_SGLANG}` (the rabitq backend is not registered)"
        )
