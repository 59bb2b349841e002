"""An independent PyTorch implementation of CodeGeeX, written from codegeex-facts.md §1.

It exists to check geex-jax against a second implementation: parity tests, `geex-convert --verify`
and the sampler benchmark's PyTorch baseline. Its `state_dict()` keys are the released names
prefixed by `language_model.` (see conversion/table.py), so a released checkpoint's tensors load
with `load_released()`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from geex_jax.model.codegeex import CodeGeeXConfig


def fast_gelu(x: torch.Tensor) -> torch.Tensor:
  # The released form, kept literally: x / (1 + exp(-1.702|x|)) * exp(0.851 (x - |x|)).
  return x / (1 + torch.exp(-1.702 * torch.abs(x))) * torch.exp(0.851 * (x - torch.abs(x)))


class SelfAttention(nn.Module):
  def __init__(self, c: CodeGeeXConfig):
    super().__init__()
    d = c.hidden_size
    self.num_heads, self.head_dim = c.num_heads, c.head_dim
    self.query = nn.Linear(d, d)
    self.key = nn.Linear(d, d)
    self.value = nn.Linear(d, d)
    self.dense = nn.Linear(d, d)

  def forward(self, q_in, kv_in, past: Optional[tuple] = None):
    """q_in, kv_in: [b, t, d]; past: (k, v) each [b, n, s_past, h]. Returns (out, (k, v))."""
    b, t, _ = q_in.shape
    split = lambda x: x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
    q, k, v = split(self.query(q_in)), split(self.key(kv_in)), split(self.value(kv_in))
    if past is not None:
      k = torch.cat([past[0], k], dim=2)
      v = torch.cat([past[1], v], dim=2)
    s = k.shape[2]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
    causal = torch.ones(t, s, dtype=torch.bool, device=q_in.device).tril(diagonal=s - t)
    scores = scores.masked_fill(~causal, -10000.0)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)
    return self.dense(out), (k, v)


class MLP(nn.Module):
  def __init__(self, c: CodeGeeXConfig):
    super().__init__()
    self.dense_h_to_4h = nn.Linear(c.hidden_size, c.ffn_size)
    self.dense_4h_to_h = nn.Linear(c.ffn_size, c.hidden_size)

  def forward(self, x):
    return self.dense_4h_to_h(fast_gelu(self.dense_h_to_4h(x)))


class Layer(nn.Module):
  def __init__(self, c: CodeGeeXConfig):
    super().__init__()
    self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_eps)
    self.attention = SelfAttention(c)
    self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_eps)
    self.mlp = MLP(c)

  def forward(self, h, query=None, past=None):
    x = self.input_layernorm(h.float()).to(h.dtype)
    a, present = self.attention(x if query is None else query, x, past)
    h = h + a
    h = h + self.mlp(self.post_attention_layernorm(h.float()).to(h.dtype))
    return h, present


class Embedding(nn.Module):
  def __init__(self, c: CodeGeeXConfig):
    super().__init__()
    self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
    self.position_embeddings = nn.Embedding(c.max_position, c.hidden_size)


class TopQueryEmbedding(nn.Module):
  def __init__(self, c: CodeGeeXConfig):
    super().__init__()
    self.top_query_embeddings = nn.Embedding(c.max_position, c.hidden_size)


class Transformer(nn.Module):
  def __init__(self, c: CodeGeeXConfig):
    super().__init__()
    self.layers = nn.ModuleList([Layer(c) for _ in range(c.num_layers)])
    self.topQueryLayer = Layer(c)
    self.final_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layernorm_eps)


class LanguageModel(nn.Module):
  def __init__(self, c: CodeGeeXConfig):
    super().__init__()
    self.embedding = Embedding(c)
    self.topQueryEmbedding = TopQueryEmbedding(c)
    self.transformer = Transformer(c)


class CodeGeeXTorch(nn.Module):
  """CodeGeeX in PyTorch. forward(tokens [b, t], past) -> (fp32 logits [b, t, v], presents)."""

  def __init__(self, config: CodeGeeXConfig):
    super().__init__()
    self.config = config
    self.language_model = LanguageModel(config)
    for p in self.parameters():  # normal(0, 0.02) like the Megatron port; LayerNorms stay 1/0
      if p.dim() > 1:
        nn.init.normal_(p, 0.0, config.init_std)

  def forward(self, tokens: torch.Tensor, past: Optional[list] = None):
    lm = self.language_model
    past_len = 0 if past is None else past[0][0].shape[2]
    positions = torch.arange(past_len, past_len + tokens.shape[1], device=tokens.device)
    positions = positions.unsqueeze(0).expand_as(tokens)
    h = lm.embedding.word_embeddings(tokens) + lm.embedding.position_embeddings(positions)
    presents = []
    layers = list(lm.transformer.layers)
    for i, layer in enumerate(layers):
      h, present = layer(h, past=None if past is None else past[i])
      presents.append(present)
    h = lm.transformer.final_layernorm(h.float()).to(h.dtype)
    top_q = lm.topQueryEmbedding.top_query_embeddings(positions)
    h, present = lm.transformer.topQueryLayer(
      h, query=top_q, past=None if past is None else past[len(layers)]
    )
    presents.append(present)
    logits = torch.matmul(h, lm.embedding.word_embeddings.weight.t())
    return logits.float(), presents

  def released_state_dict(self) -> dict:
    """{released name: tensor} (the keys of conversion/table.py)."""
    return {k[len("language_model.") :]: v for k, v in self.state_dict().items()}

  def load_released(self, flat: dict, strict: bool = True):
    """Loads {released name: tensor}."""
    return self.load_state_dict({f"language_model.{k}": v for k, v in flat.items()}, strict=strict)


@torch.no_grad()
def greedy_generate(
  model: CodeGeeXTorch,
  tokens: torch.Tensor,
  max_new_tokens: int,
  eos_id: Optional[int] = None,
  vocab_limit: Optional[int] = None,
) -> torch.Tensor:
  """A plain KV-cache greedy loop (the sampler's reference and benchmark baseline).

  tokens: [b, t] -> new tokens [b, max_new_tokens] (rows that emitted EOS keep emitting it).
  vocab_limit: choose among the first ids only (the tokenizer's; the embedding is padded).
  """
  logits, past = model(tokens)
  out = []
  done = torch.zeros(tokens.shape[0], dtype=torch.bool)
  for _ in range(max_new_tokens):
    nxt = logits[:, -1, :vocab_limit].argmax(-1)
    if eos_id is not None:
      nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
      done |= nxt == eos_id
    out.append(nxt)
    if eos_id is not None and bool(done.all()):
      break
    logits, past = model(nxt[:, None], past)
  return torch.stack(out, dim=1)
