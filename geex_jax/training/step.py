"""The loss and the jitted train step: forward, backward, gradient accumulation over microbatches,
clipped AdamW update (optax), and the host-side check that the batch's ids fit the vocabulary."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from geex_jax.errors import ConfigError
from geex_jax.model.codegeex import CodeGeeX, CodeGeeXConfig, output_logits
from geex_jax.training import optim


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: Any  # fp32 master weights
  opt_state: Any


def check_token_range(batch: dict, vocab_size: int) -> None:
  """Out-of-range ids would be gathered silently (clamped) by the embedding: refuse them.

  Catches a tokenizer whose vocabulary is larger than the model's (e.g. the real tokenizer with
  the demo's 512-row table). A host-side max over one batch costs microseconds.
  """
  top = int(np.max(batch["decoder_input_tokens"], initial=0))
  top = max(top, int(np.max(batch["decoder_target_tokens"], initial=0)))
  if top >= vocab_size:
    raise ConfigError(
      f"the data has token id {top} but the model's vocabulary has {vocab_size} "
      "rows: use a tokenizer that fits, or set VOCAB_SIZE (52224 for the "
      "CodeGeeX tokenizer)"
    )


def loss_fn(
  params: Any, batch: dict, config: CodeGeeXConfig, dropout_rng: jax.Array, total_weight: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token CE / total_weight, sum of weighted token CE) of one (micro)batch.

  Dividing by the whole batch's weight, not the microbatch's, makes the sum of microbatch
  gradients exactly the full batch's gradient. With config.loss_chunk_size the logits are made
  a chunk of positions at a time (chunked_cross_entropy).
  """
  deterministic = config.dropout_rate == 0.0
  chunked = 0 < config.loss_chunk_size < batch["decoder_input_tokens"].shape[1]
  out = CodeGeeX(config).apply(
    {"params": params},
    batch["decoder_input_tokens"],
    batch["decoder_positions"],
    batch["decoder_segment_ids"],
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": dropout_rng},
    return_hidden=chunked,
  )
  targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
  if chunked:
    embedding = params["word_embeddings"]["embedding"]
    loss_sum = chunked_cross_entropy(config, out, embedding, targets, weights)
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(out, targets)
    loss_sum = jnp.sum(ce * weights)
  return loss_sum / total_weight, loss_sum


def chunked_cross_entropy(
  config: CodeGeeXConfig, hidden: jax.Array, embedding: jax.Array, targets, weights
) -> jax.Array:
  """sum(weights * token CE) from the top layer's output [b, t, d], `loss_chunk_size`
  positions at a time: a scan over chunks of [b, c, vocab] logits, each recomputed in the
  backward (jax.checkpoint), so fp32 logits of the whole sequence are never live. The
  embedding's gradient accumulates over the chunks in its own (fp32 master) dtype."""
  b, t, _ = hidden.shape
  c = config.loss_chunk_size
  if t % c:
    raise ConfigError(f"loss_chunk_size {c} does not divide the sequence length {t}")

  def chunk(total, xs):
    h, tgt, w = xs
    ce = optax.softmax_cross_entropy_with_integer_labels(output_logits(config, h, embedding), tgt)
    return total + jnp.sum(ce * w), None

  split = lambda x: x.reshape(b, t // c, c, *x.shape[2:]).swapaxes(0, 1)
  total, _ = jax.lax.scan(
    jax.checkpoint(chunk, prevent_cse=False),
    jnp.zeros((), jnp.float32),
    (split(hidden), split(targets), split(weights)),
  )
  return total


def make_train_step(
  config: CodeGeeXConfig,
  optimizer: optax.GradientTransformation,
  schedule: Callable[[Any], Any],
  *,
  microbatches: int = 1,
  param_shardings: Any = None,
  microbatch_sharding: Any = None,
) -> Callable:
  """train_step(state, batch, rng) -> (state, metrics); batch arrays [batch, length].

  With microbatches > 1 the gradient is accumulated (fp32) over a lax.scan of microbatches and one
  optimizer update is applied: same update as the whole batch at once, 1/microbatches the
  activation memory.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"]), 1.0)
    step_rng = jax.random.fold_in(rng, state.step)

    def micro(mb, i):
      (_, loss_sum), grads = grad_fn(
        state.params, mb, config, jax.random.fold_in(step_rng, i), total_weight
      )
      if param_shardings is not None:
        # Reduce-scatter the gradient to the params' layout right away (FSDP).
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      return grads, loss_sum

    if microbatches == 1:
      grads, loss_sum = micro(batch, 0)
    else:

      def split(x):
        # Row j of microbatch i is row j * M + i: every microbatch is spread over all data
        # shards (a plain reshape would put microbatch 0 on the first shards only).
        b = x.shape[0]
        x = x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        if microbatch_sharding is not None:
          x = jax.lax.with_sharding_constraint(x, microbatch_sharding)
        return x

      mbs = jax.tree.map(split, batch)

      def body(carry, xs):
        acc, loss_acc = carry
        mb, i = xs
        grads, loss_sum = micro(mb, i)
        return (jax.tree.map(jnp.add, acc, grads), loss_acc + loss_sum), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      if param_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
      (grads, loss_sum), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32)), (mbs, jnp.arange(microbatches))
      )

    grad_norm = optim.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The new params' norm: a NaN that entered through the update shows up in this step's
    # metrics, before the state can be checkpointed (the loss would show it one step later).
    metrics = {
      "loss": loss_sum / total_weight,
      "grad_norm": grad_norm,
      "param_norm": optim.global_norm(params),
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
      "loss_tokens": total_weight,
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step
