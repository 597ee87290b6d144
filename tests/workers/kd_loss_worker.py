"""TP worker for the vocab-parallel KL: each rank holds a vocab shard; compares with a full-vocab fp64 reference.

Run under torchrun (gloo). Exits non-zero with a message on the first mismatch.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from minitron_nemo import runtime
from minitron_nemo.distill.losses import logits_kl_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_reference import reference_kl  # noqa: E402


def main():
    tp = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    runtime.init_distributed(tp, 1)
    from megatron.core import parallel_state as ps

    rank, world = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    assert world == tp, (world, tp)

    # Record every collective's size: the full vocabulary must never travel.
    sizes = []
    orig_all_gather, orig_all_reduce = dist.all_gather, dist.all_reduce
    dist.all_gather = lambda out, x, *a, **k: (sizes.append(x.numel()), orig_all_gather(out, x, *a, **k))[1]
    dist.all_reduce = lambda x, *a, **k: (sizes.append(x.numel()), orig_all_reduce(x, *a, **k))[1]

    b, s, v = 3, 5, 32 * tp
    vl = v // tp
    checks = 0
    for dtype, rtol, atol in ((torch.float64, 1e-10, 1e-12), (torch.float32, 1e-4, 2e-6)):
        for reverse in (False, True):
            for tau in (1.0, 2.0):
                for top_k in (None, 7, 40):
                    for chunk in (None, 4):
                        g = torch.Generator().manual_seed(1000 + checks)   # same full logits on every rank
                        full_s = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
                        full_t = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
                        mask = (torch.rand(b, s, generator=g) > 0.3).double()
                        mask[0, 0] = 1.0
                        shard = slice(rank * vl, (rank + 1) * vl)
                        st = full_s[..., shard].to(dtype).clone().requires_grad_()
                        tt = full_t[..., shard].to(dtype).clone()
                        sizes.clear()
                        out = logits_kl_loss(st, tt, mask, temperature=tau, reverse=reverse, top_k=top_k,
                                             chunk_size=chunk)
                        out.loss.backward()
                        ref_s = full_s.to(dtype).double().requires_grad_()
                        ref = reference_kl(ref_s, full_t.to(dtype), mask, tau, reverse, top_k)
                        ref.backward()
                        what = f"rank {rank} {dtype} reverse={reverse} tau={tau} top_k={top_k} chunk={chunk}"
                        torch.testing.assert_close(out.loss.double(), ref, rtol=rtol, atol=atol, msg=what + " loss")
                        torch.testing.assert_close(st.grad.double(), ref_s.grad[..., shard], rtol=rtol,
                                                   atol=atol, msg=what + " grad")
                        assert out.num_tokens.item() == mask.sum().item(), what
                        per_token = 3 if top_k is None else min(top_k, vl)   # 3 stats, or k candidates
                        assert sizes and max(sizes) <= b * s * per_token, f"{what}: a collective moved {max(sizes)}"
                        checks += 1
    print(f"rank {rank}: OK {checks} checks", flush=True)
    runtime.shutdown()


if __name__ == "__main__":
    main()
