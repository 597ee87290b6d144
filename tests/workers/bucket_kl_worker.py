"""TP worker for the teacher-cache loss: teacher top-K and the bucket KL with vocab-sharded logits equal
the single-rank result (values and the student's gradient shard). Run under torchrun (gloo); exits
non-zero with a message on the first mismatch."""

import sys

import torch

from minitron_nemo import runtime
from minitron_nemo.distill.bucket_kl import bucket_kl, student_nll_and_logprobs, teacher_topk


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
    labels = torch.randint(0, v, (n,), generator=g)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    checks = 0
    for k in (3, v):
        for tau in (1.0, 2.0):
            ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
            wk = torch.randn(n, k, generator=g, dtype=torch.float64)
            outs = []
            for s, grp, chunk in ((student, None, None), (student[:, shard], group, 5)):
                a = s.clone().requires_grad_(True)
                nll, lp = student_nll_and_logprobs(a, labels, ids, tau, grp, chunk)
                ((nll * w).sum() + (lp * wk).sum()).backward()
                outs.append((nll, lp, a.grad))
            what = f"k={k} tau={tau} rank={rank}"
            assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12), f"NLL differs: {what}"
            assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12), f"log-probs differ: {what}"
            assert torch.allclose(outs[0][2][:, shard], outs[1][2], rtol=1e-10, atol=1e-12), f"grad differs: {what}"
            checks += 1
    runtime.print0(f"bucket_kl_worker: NLL and log-probabilities: {checks} checks passed at TP={tp}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
