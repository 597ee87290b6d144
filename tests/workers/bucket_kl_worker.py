"""TP worker for the teacher-cache loss: teacher top-K and the bucket KL with vocab-sharded logits equal
the single-rank result (values and the student's gradient shard). Run under torchrun (gloo); exits
non-zero with a message on the first mismatch."""

import sys

import torch

from minitron_nemo import runtime
from minitron_nemo.distill.bucket_kl import bucket_kl, teacher_topk


def main():
    tp = int(sys.argv[1])
    runtime.init_distributed(tp, 1)
    from megatron.core import parallel_state as ps

    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    n, v = 12, 40 * tp
    vl = v // tp
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    checks = 0
    for k in (1, 7, 40, v):
        for reverse in (False, True):
            for tau in (1.0, 2.0):
                ids1, lp1, lse1 = teacher_topk(teacher, k, tau)
                s1 = student.clone().requires_grad_(True)
                kl1 = bucket_kl(s1, ids1, lp1, tau, reverse)
                kl1.sum().backward()
                shard = slice(rank * vl, (rank + 1) * vl)
                ids2, lp2, lse2 = teacher_topk(teacher[:, shard].contiguous(), k, tau, group)
                s2 = student[:, shard].clone().requires_grad_(True)
                kl2 = bucket_kl(s2, ids2, lp2, tau, reverse, group, chunk=5)
                kl2.sum().backward()
                what = f"k={k} reverse={reverse} tau={tau} rank={rank}"
                assert torch.equal(ids1, ids2), f"top-k ids differ: {what}"
                assert torch.allclose(lp1, lp2, rtol=1e-12, atol=1e-12), f"log-probs differ: {what}"
                assert torch.allclose(lse1, lse2, rtol=1e-12, atol=1e-12), f"normalisers differ: {what}"
                assert torch.allclose(kl1, kl2, rtol=1e-10, atol=1e-12), f"KL differs: {what}"
                assert torch.allclose(s1.grad[:, shard], s2.grad, rtol=1e-9, atol=1e-12), f"grad differs: {what}"
                checks += 1
    runtime.print0(f"bucket_kl_worker: {checks} checks passed at TP={tp}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
