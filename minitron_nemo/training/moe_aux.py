"""The MoE router's load-balancing loss in the training log.

Megatron-Core's router adds ``moe_aux_loss_coeff x`` the load-balancing loss to the gradients itself
(``MoEAuxLossAutoScaler``; the schedule scales it per micro-batch) and records the *unscaled* loss of
each layer in a tracker. ``take`` reads that tracker after a step, reduces it over pipeline stages and
data-parallel ranks (Megatron-Core's reduction), and returns the loss as it enters the objective:
``coeff x`` its mean over MoE layers and micro-batches, logged as ``moe_aux`` beside the KD / LM loss.
"""

from __future__ import annotations


def take(config, num_microbatches: int) -> dict:
    """``{"moe_aux": value}`` for the last train step (and the tracker cleared); ``{}`` without one."""
    if not getattr(config, "num_moe_experts", None) or not config.moe_aux_loss_coeff:
        return {}
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if "load_balancing_loss" not in tracker:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
    values = tracker["load_balancing_loss"]["values"].float()
    value = float(config.moe_aux_loss_coeff) * float(values.sum()) / (num_microbatches * config.num_layers)
    moe_utils.clear_aux_losses_tracker()
    return {"moe_aux": value}
