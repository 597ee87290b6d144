"""Expert layouts share one checkpoint: Megatron-Core's ``SequentialMLP`` (import, pruning, export) and its
legacy grouped-GEMM ``GroupedMLP`` (``build_model(mc, grouped_gemm=True)`` without Transformer Engine).

What is proven (fp32, a random 4-layer 8-expert top-2 Mixtral-like model, at EP=1 and EP=2 on 2 gloo ranks),
through the project's own ``store.save_checkpoint`` / ``store.load_weights``:

* a sequential checkpoint loads into the grouped model and a grouped checkpoint into the sequential model,
  with the same logits (relative 1e-5) and each expert's weights bitwise where ``GroupedMLP.forward``
  reads them (``weight1.view(E_local, hidden, 2 * ffn)[e]`` = the sequential ``linear_fc1.weight.T``,
  gate then up; ``weight2.view(E_local, ffn, hidden)[e]`` = ``linear_fc2.weight.T``);
* the loads really change the target model (every expert tensor, and the logits by > 0.01);
* both layouts' checkpoints (EP=1 and EP=2) hold the same tensors: keys, global shapes, dtypes;
* the EP=1 checkpoints of both layouts load into the EP=2 grouped (and sequential) models with the EP=1
  logits, so global expert numbering survives the grouped layout under expert parallelism;
* a backward pass through the grouped model gives every expert block of ``weight1``/``weight2`` the gradient
  the sequential model gives that expert, and every other parameter the same gradient (relative 1e-5); at
  EP=2 each expert's gradient is twice its EP=1 gradient (both ranks feed the same tokens).

What is not: the grouped GEMM itself. ``grouped_gemm.ops.gmm`` is a CUDA/bf16-only kernel; the worker stands
in a torch reference with its documented semantics (and flips ``GroupedMLP``'s ``config.bf16`` guard on a
private config copy), so the layouts and the checkpoint format are Megatron-Core's real code but the kernel
is not. TE's ``TEGroupedMLP`` (what GPU training builds) is not exercised: Transformer Engine does not install
on CPU. Neither is TP > 1 for the experts. On Megatron-Core 0.19, which removed the legacy ``GroupedMLP``
(the local spec then builds ``SequentialMLP`` even with ``moe_grouped_gemm``), the test is skipped.
"""

import pytest

from conftest import ROOT, run_py, run_torchrun

WORKER = ROOT / "tests" / "workers" / "moe_layout_worker.py"


def test_sequential_and_grouped_experts_share_checkpoints_logits_and_gradients(tmp_path):
    p = run_py(WORKER, tmp_path)
    if "SKIP " in p.stdout:
        pytest.skip(p.stdout[p.stdout.index("SKIP ") + 5:].splitlines()[0])
    for want in ("OK ep=1 sequential checkpoint -> grouped model", "OK ep=1 the load changed the grouped model",
                 "OK ep=1 grouped checkpoint -> sequential model", "OK ep=1 checkpoint format",
                 "OK backward ep=1", "OK layouts ep=1 done"):
        assert want in p.stdout, (want, p.stdout[-3000:])
    q = run_torchrun(WORKER, 2, tmp_path, "ep2")
    for want in ("OK ep=2 sequential checkpoint -> grouped model", "OK ep=2 grouped checkpoint -> sequential model",
                 "OK ep=2 checkpoint format", "OK backward ep=2", "OK ep=2 loads the EP=1 checkpoints",
                 "OK ep=2 expert gradients", "OK layouts ep=2 done"):
        assert want in q.stdout, (want, q.stdout[-3000:])
