"""Direct references for the distillation-loss tests."""

import torch.nn.functional as F


def reference_kl(s, t, mask, tau=1.0, reverse=False, top_k=None):
    """Direct full-vocabulary fp64 masked mean of tau^2 * KL; logits [..., V], mask [...]."""
    s, t = s.double() / tau, t.double() / tau
    if top_k:
        idx = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, idx), t.gather(-1, idx)
    ls, lt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    p, q = (ls, lt) if reverse else (lt, ls)
    kl = (p.exp() * (p - q)).sum(-1) * tau ** 2
    return (kl * mask).sum() / mask.sum()
