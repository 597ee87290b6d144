"""Sandwich norms (Gemma 3): a norm on the output of the attention and of the MLP, before each residual add.

Megatron-Core's ``TransformerLayer`` has norms before its attention and MLP only. The norm after each is
a layer-spec choice here: ``post_normed(linear)`` is the spec's output projection (``linear_proj`` of the
attention, ``linear_fc2`` of the MLP) followed by a norm of the hidden size. A row-parallel projection
all-reduces its output over the tensor-parallel group (reduce-scatters it over the sequence with sequence
parallelism), so the norm sees whole hidden vectors on every rank; its weight is replicated, like the
other norms (``models/layout.py``: a name ending in ``post_norm.weight`` is not sharded), and saved in
the distributed checkpoint as ``...linear_proj.post_norm.weight`` / ``...linear_fc2.post_norm.weight``.
"""

from __future__ import annotations

from functools import lru_cache

from minitron_nemo.models.layers import TorchNorm


@lru_cache(maxsize=None)
def post_normed(linear: type, norm: type = TorchNorm) -> type:
    """``linear`` (a row-parallel projection class returning ``(output, bias)``) with ``norm`` applied to its
    output; the same class for the same arguments, so specs compare equal."""

    class PostNormed(linear):
        def __init__(self, input_size, output_size, *args, config, **kwargs):
            super().__init__(input_size, output_size, *args, config=config, **kwargs)
            self.post_norm = norm(config, output_size, eps=config.layernorm_epsilon)

        def forward(self, x, *args, **kwargs):
            out, bias = super().forward(x, *args, **kwargs)
            if bias is not None:  # the norm is of the whole projection (Gemma 3 has no biases)
                out, bias = out + bias, None
            return self.post_norm(out), bias

    PostNormed.__name__ = PostNormed.__qualname__ = f"PostNormed{linear.__name__}"
    return PostNormed
