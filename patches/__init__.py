"""SGLang plugin entry point (group ``sglang.srt.plugins``)."""


def load() -> None:
    pass
