"""Activation recomputation: the names the layers give their products, and the policies.

Every block tags its matmul outputs with `jax.ad_checkpoint.checkpoint_name` (names below, as
MaxText spells them). A remat policy decides which of them the backward keeps; everything else
in a block (LayerNorms, FastGELU, the attention softmax) is recomputed from the block input.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
from jax.ad_checkpoint import checkpoint_name

QUERY, KEY, VALUE = "query_proj", "key_proj", "value_proj"
CONTEXT = "context"  # attention output, before the output projection
OUT_PROJ = "out_proj"  # the attention output projection
MLP_IN, MLP_OUT = "mlpwi", "mlpwo"  # [d -> f] (before FastGELU) and [f -> d]

NAMES = (QUERY, KEY, VALUE, CONTEXT, OUT_PROJ, MLP_IN, MLP_OUT)

_save = jax.checkpoint_policies.save_only_these_names
_policies = jax.checkpoint_policies

# name -> policy (None: no remat). From most memory (and least recompute) to least.
REMAT_POLICIES: dict[str, Optional[Callable]] = {
  "none": None,
  "dots": _policies.checkpoint_dots,  # every product, attention scores included
  "dots_no_batch": _policies.checkpoint_dots_with_no_batch_dims,  # the weight products
  "minimal": _save(*NAMES),  # every named product: recompute only elementwise ops and softmax
  "save_dot_except_mlpwi": _save(QUERY, KEY, VALUE, CONTEXT, OUT_PROJ, MLP_OUT),
  "save_dot_except_mlp": _save(QUERY, KEY, VALUE, CONTEXT, OUT_PROJ),
  "save_qkv_proj": _save(QUERY, KEY, VALUE),
  "full": _policies.nothing_saveable,  # keep only each block's input
}

__all__ = ["REMAT_POLICIES", "NAMES", "checkpoint_name"]
