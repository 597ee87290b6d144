"""``layer_types`` of an HF ``config.json``: which layers attend within the sliding window.

transformers writes one entry per layer, ``sliding_attention`` or ``full_attention`` (Qwen2/3, Gemma 3,
gpt-oss). ``window_flags`` reads them as ``ModelConfig.window_layers`` flags (1 windowed, 0 full), and
``check_window`` the window size itself.
"""

from __future__ import annotations

from minitron_nemo.errors import UserError

KINDS = {"sliding_attention": 1, "full_attention": 0}


def window_flags(types, n: int, arch: str) -> list:
    """One flag per layer of ``types`` (``n`` of them); anything else is a one-line error naming ``arch``."""
    if not isinstance(types, list) or len(types) != n or any(t not in KINDS for t in types):
        raise UserError(f"layer_types={types} is not supported for {arch}; allowed: {n} entries, each "
                        f"'sliding_attention' or 'full_attention'")
    return [KINDS[t] for t in types]


def layer_types(flags) -> list:
    return ["sliding_attention" if f else "full_attention" for f in flags]


def check_window(window, arch: str, optional: bool = True) -> None:
    """``sliding_window`` is a positive integer (or null, where ``optional``)."""
    if window is None and optional:
        return
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        allowed = "null (full attention) or an integer >= 1" if optional else "an integer >= 1"
        raise UserError(f"sliding_window={window!r} is not supported for {arch}; allowed: {allowed}")
