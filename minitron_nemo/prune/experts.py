"""Mixture-of-experts pruning: expert and expert-FFN importance, and moving kept experts between ranks.

Scores come from the same single calibration pass as the dense axes (``importance.estimate``), by hooks
on Megatron-Core's ``MoELayer`` (router and ``SequentialMLP``; TE's grouped GEMM has no per-expert
modules to hook, so calibration needs the sequential expert MLP):

  score                 hook point                               per expert e of layer i
  --------------------  ---------------------------------------  -----------------------------------------
  expert_routed_l2      output of expert e (weighted by its      sqrt(sum over routed tokens t of
                        router probability p_te)                 ||p_te * f_e(x_t)||^2): what e adds to
                                                                 the layer output (default)
  expert_output_l2      same, divided by p_te                    sqrt(sum_t ||f_e(x_t)||^2): per-expert L2
                                                                 of the output, router weight ignored
  expert_router_mass    router input (every token, all experts)  sum_t softmax(router logits)_te
  expert_frequency      expert input                             number of tokens routed to e
  expert_ffn            input of expert e's linear_fc2           sqrt(sum_t (p_te * act(x_t))_c^2) per
                        (after the activation and p_te)          neuron c

Expert FFN width is homogeneous (every expert of every layer keeps ``moe_ffn_hidden_size`` neurons,
as Megatron-Core and HF configs require), but the neurons are chosen per expert: neuron c of expert e
and neuron c of expert e' are unrelated, so one ranking across experts would mean nothing.

Parallel assembly: expert statistics are already summed over the tokens of every rank of the expert-
parallel group (the all-to-all brought them); they are summed over the expert data-parallel group,
gathered over expert-TP (neurons) and EP (experts), then over PP stages like the dense scores. Router
mass is computed from each rank's own tokens and summed over the data-parallel group. Under TP without
sequence parallelism every TP rank holds every token and the dispatcher hands each expert all TP ranks'
copies (identical), so expert statistics are divided by TP; with sequence parallelism each token comes
once and the router mass of the TP ranks' sequence chunks is summed. An expert's output on an expert-TP
rank is a partial sum (the combine step reduces it): the hook sums it over expert-TP before its norm.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from minitron_nemo import runtime
from minitron_nemo.errors import UserError
from minitron_nemo.models import layout, moe
from minitron_nemo.prune.scores import all_gather_along, all_reduce_over, top_k

EXPERT_SCORES = ("routed_l2", "output_l2", "router_mass", "frequency")


def is_moe_layer(layer) -> bool:
    return hasattr(layer.mlp, "router")


class ExpertCollector:
    """Hooks on this rank's MoE layers accumulating the expert statistics (fp64)."""

    def __init__(self, model):
        layers = list(model.decoder.layers)
        mlp = layers[0].mlp
        if not hasattr(mlp.experts, "local_experts"):
            raise UserError(f"expert importance needs the sequential expert MLP, this model has "
                            f"{type(mlp.experts).__name__}; allowed: build it without grouped GEMM")
        n, E = len(layers), mlp.config.num_moe_experts
        e_local = len(mlp.experts.local_experts)
        f_local = mlp.experts.local_experts[0].linear_fc2.weight.shape[1]
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=runtime.device())  # noqa: E731
        self.routed, self.output, self.count = z(n, e_local), z(n, e_local), z(n, e_local)
        self.neurons = z(n, e_local, f_local)
        self.mass = z(n, E)
        self.sequence_parallel = bool(mlp.config.sequence_parallel)
        self.handles = []
        for i, layer in enumerate(layers):
            router = layer.mlp.router
            self.handles.append(router.register_forward_pre_hook(self._router_hook(i)))
            for k, expert in enumerate(layer.mlp.experts.local_experts):
                self.handles.append(expert.register_forward_hook(self._expert_hook(i, k)))
                self.handles.append(expert.linear_fc2.register_forward_pre_hook(self._fc2_hook(i, k)))

    def _router_hook(self, i):
        def hook(router, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            logits = F.linear(x, router.weight.detach().float())
            if router.config.moe_router_score_function == "sigmoid":
                probs = torch.sigmoid(logits)
            else:
                probs = torch.softmax(logits, dim=-1)
            self.mass[i] += probs.sum(0).double()
        return hook

    def _expert_hook(self, i, k):
        etp = parallel_state.get_expert_tensor_parallel_world_size()

        def hook(expert, args, out):
            y = out[0].detach().float()
            if etp > 1:  # an expert's linear_fc2 leaves the expert-TP sum to the token combine: sum it here
                y = y.clone()
                dist.all_reduce(y, group=parallel_state.get_expert_tensor_parallel_group())
            p = args[1].detach().float().reshape(-1, 1) if len(args) > 1 else y.new_ones(y.shape[0], 1)
            self.routed[i, k] += y.square().sum().double()
            self.output[i, k] += (y / p.clamp_min(1e-30)).square().sum().double()
            self.count[i, k] += y.shape[0]
        return hook

    def _fc2_hook(self, i, k):
        def hook(mod, args):
            self.neurons[i, k] += args[0].detach().float().square().sum(0).double()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def finalize(c: ExpertCollector) -> dict:
    """Global fp32 expert scores ``[L, E]`` and ``expert_ffn [L, E, F]``, identical on every rank."""
    ps = parallel_state
    edp, etp, ep = (ps.get_expert_data_parallel_group(), ps.get_expert_tensor_parallel_group(),
                    ps.get_expert_model_parallel_group())
    tp = ps.get_tensor_model_parallel_world_size()
    for acc in (c.routed, c.output, c.count, c.neurons):
        all_reduce_over(acc, edp)
        if tp > 1 and not c.sequence_parallel:
            acc /= tp
    all_reduce_over(c.mass, ps.get_data_parallel_group())
    if c.sequence_parallel:
        all_reduce_over(c.mass, ps.get_tensor_model_parallel_group())
    neurons = all_gather_along(c.neurons.sqrt(), etp, dim=2)
    per_layer = {"expert_routed_l2": c.routed.sqrt(), "expert_output_l2": c.output.sqrt(),
                 "expert_frequency": c.count, "expert_ffn": neurons}
    per_layer = {k: all_gather_along(v, ep, dim=1) for k, v in per_layer.items()}
    per_layer["expert_router_mass"] = c.mass
    pp_g = ps.get_pipeline_model_parallel_group()
    return {k: all_gather_along(v, pp_g, dim=0).float().cpu() for k, v in per_layer.items()}


# ----------------------------------------------------------------------------- the plan
def plan_experts(scores: dict, layers: List[int], num_experts: int, ffn: int, score: str):
    """Per kept layer: the kept experts (ascending original order) by ``expert_<score>``, and for each
    kept expert its kept neurons ``[E', F']``."""
    key = f"expert_{score}"
    if key not in scores:
        raise UserError(f"prune.importance.expert_score={score!r}: the scores lack {key!r}; allowed: "
                        f"{', '.join(EXPERT_SCORES)}, from scores with every expert score (the calibration "
                        f"pass records each of them)")
    experts, neurons = [], []
    for i in layers:
        kept = top_k(scores[key][i], num_experts)
        experts.append(kept)
        neurons.append(torch.stack([top_k(scores["expert_ffn"][i, e], ffn) for e in kept.tolist()]))
    return experts, neurons


def slice_expert_tensor(mc, suffix: str, t: torch.Tensor, hidden: torch.Tensor, neurons: torch.Tensor):
    """One expert's full (TP-unsharded) ``linear_fc1`` / ``linear_fc2`` weight or bias, kept hidden channels
    and neurons (SwiGLU: the same neurons in the gate and the up half)."""
    if suffix.endswith("linear_fc1.weight"):
        rows = torch.cat([neurons, neurons + mc.moe_ffn_hidden_size]) if mc.gated else neurons
        return t[rows][:, hidden]
    if suffix.endswith("linear_fc2.weight"):
        return t[hidden][:, neurons]
    if suffix.endswith("linear_fc1.bias"):
        return t[torch.cat([neurons, neurons + mc.moe_ffn_hidden_size]) if mc.gated else neurons]
    if suffix.endswith("linear_fc2.bias"):
        return t[hidden]
    raise NotImplementedError(f"pruning does not know how to slice expert tensor {suffix}")


def slice_shared_expert_tensor(mc, name: str, t: torch.Tensor, hidden: torch.Tensor, neurons: torch.Tensor):
    """A shared expert's full (TP-unsharded) tensor: its kept neurons like a dense MLP's (SwiGLU: the same
    neurons in the gate and the up half), its gate's kept hidden channels."""
    if name.endswith("linear_fc1.weight"):
        f = mc.moe_shared_expert_intermediate_size
        rows = torch.cat([neurons, neurons + f]) if mc.gated else neurons
        return t[rows][:, hidden]
    if name.endswith("linear_fc2.weight"):
        return t[hidden][:, neurons]
    if name.endswith("gate_weight"):  # [1, H]
        return t[:, hidden]
    raise NotImplementedError(f"pruning does not know how to slice shared-expert tensor {name}")


# ----------------------------------------------------------------------------- moving experts
def _rank_table() -> dict:
    """(pp stage, ep rank, expert-tp rank, expert-dp rank) -> global rank, for every rank."""
    ps = parallel_state
    me = (ps.get_pipeline_model_parallel_rank(), ps.get_expert_model_parallel_rank(),
          ps.get_expert_tensor_parallel_rank(), ps.get_expert_data_parallel_rank())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {me: 0}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    return {pos: r for r, pos in enumerate(everyone)}


@torch.no_grad()
def fill_experts(old_sd, new_sd, mc, new_mc, plan, per_old: int, per_new: int) -> None:
    """Copy every kept expert of every kept layer into its place in the pruned model.

    Kept expert ``n`` (new global number) of new layer ``j`` is old expert ``plan.experts[j][n]`` of old
    layer ``plan.layers[j]``. Its owner (old stage, old EP rank) gathers it over expert-TP, slices it,
    re-shards it, and keeps it or sends it to the rank at the same expert-TP / expert-DP position that
    holds new expert ``n`` (new stage, EP rank ``n // (E' / ep)``). Every rank walks the same order, so
    sends and receives pair up."""
    ps = parallel_state
    ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    stage, edp = ps.get_pipeline_model_parallel_rank(), ps.get_expert_data_parallel_rank()
    table = _rank_table()
    n_old, n_new = mc.num_moe_experts // ep, new_mc.num_moe_experts // ep
    suffixes = sorted(k.split(".local_experts.0.", 1)[1] for k in old_sd
                      if k.startswith("decoder.layers.0.mlp.experts.local_experts.0.")
                      and not k.endswith("_extra_state"))
    for j, i in enumerate(plan.layers):
        src, dst = i // per_old, j // per_new
        for n, e in enumerate(plan.experts[j].tolist()):
            owner, dest = (src, e // n_old), (dst, n // n_new)
            for suf in suffixes:
                old_name = moe.expert_name(f"decoder.layers.{i - src * per_old}.", e % n_old, suf)
                new_name = moe.expert_name(f"decoder.layers.{j - dst * per_new}.", n % n_new, suf)
                if (stage, ep_rank) == owner:
                    full = layout.gather_tp(mc, suf, old_sd[old_name],
                                            parallel_state.get_expert_tensor_parallel_group())
                    piece = slice_expert_tensor(mc, suf, full, plan.hidden, plan.expert_ffn[j][n])
                    piece = layout.shard_tensor(new_mc, suf, piece, etp_rank, etp).contiguous()
                    if owner == dest:
                        new_sd[new_name].copy_(piece)
                    else:
                        dist.send(piece, dst=table[(dest[0], dest[1], etp_rank, edp)])
                elif (stage, ep_rank) == dest:
                    buf = torch.empty_like(new_sd[new_name])
                    dist.recv(buf, src=table[(owner[0], owner[1], etp_rank, edp)])
                    new_sd[new_name].copy_(buf)
