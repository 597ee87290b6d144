"""``config.json`` fields several families read alike.

``shape_fields``: the model's width and head shape (``hf._shape_fields`` writes them). ``layer_types``:
transformers writes one entry per layer, ``sliding_attention`` or ``full_attention`` (Qwen2/3, Gemma 3,
gpt-oss); ``window_flags`` reads them as ``ModelConfig.window_layers`` flags (1 windowed, 0 full), and
``check_window`` the window size itself.
"""

from __future__ import annotations

from minitron_nemo.errors import UserError

KINDS = {"sliding_attention": 1, "full_attention": 0}


def shape_fields(hf: dict) -> dict:
    """``ModelConfig``'s hidden, FFN, head, query-group, head_dim and vocabulary fields of a ``config.json``
    (``head_dim`` absent: hidden / heads)."""
    heads = hf["num_attention_heads"]
    return dict(hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
                num_query_groups=hf.get("num_key_value_heads") or heads,
                kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"])


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
