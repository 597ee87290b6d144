"""A quiet console: the warnings that are expected and harmless, filtered once for the whole package.

Filtered: Megatron-Core's notices that Transformer Engine / apex are not installed (CPU mode and
plain-torch environments fall back to torch on purpose), torch's notice about the ``.grad`` of the
distributed optimizer's parameter-shard views (Megatron-Core's design), and deprecation notices raised inside
Megatron-Core, torch and Hydra about their own internals. Everything else still shows, in particular
warnings raised by this project's code or about the user's data and models.
"""

from __future__ import annotations

import logging
import warnings

_DONE = False
HARMLESS_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r".*(apex|transformer_engine|Transformer Engine).*(not installed|not available|is not found)",
    r"TypedStorage is deprecated",
    r"`torch\.distributed\._sharded_tensor` will be deprecated",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    # Megatron-Core's distributed optimizer keeps fp32 main-parameter shards as views of the parameters
    # and sets and reads their .grad by design
    r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
)
# Log records that repeat an exception which is raised right after and reported by the project as one line
RERAISED = {"megatron.core.dist_checkpointing.strategies.filesystem_async": "encountered an error"}
THIRD_PARTY_INTERNALS = r"(megatron|torch|hydra|omegaconf|transformers|lm_eval|datasets)(\.|$)"


def install_filters() -> None:
    """Add the warning filters to the current ``warnings`` state (``quiet`` does it once per process)."""
    for msg in HARMLESS_MESSAGES:
        warnings.filterwarnings("ignore", message=msg)
    for cat in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=cat, module=THIRD_PARTY_INTERNALS)
    # Megatron-Core announces its own deprecations as UserWarnings (e.g. "full scope is deprecated")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron(\.|$)", message=r".*deprecat")


def quiet() -> None:
    """Install the filters (idempotent). Called when ``minitron_nemo`` is imported."""
    global _DONE
    if _DONE:
        return
    install_filters()
    for name, text in RERAISED.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())
    _DONE = True
