"""Text in, text out: `Sampler` loads a checkpoint and a tokenizer and turns prompts into
completions (sampled, streamed, or by beam search), cut where the reference stop rules say.

The token-level work lives in `decoding` (the KV-cache decode loop, `generate_ids`),
`beam_search` and `token_choice` (top-k / top-p). This module adds what needs
text: the language tag line, the tokenizer, user stop strings and the text stop rules, checked on
the host between decode chunks (`Sampler._host_check`). The final text of a row is its decoded
tokens cut by `stop_rules.truncate` (the evaluator's reference rule) and by the first stop string
(`cut_text`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional, Sequence

import jax

from geex_jax import languages, stop_rules
from geex_jax.inference import quantization
from geex_jax.model import codegeex as M
from geex_jax.inference.beam_search import beam_search_ids
from geex_jax.inference.decoding import HostCheck, generate_ids
from geex_jax.errors import InputError
from geex_jax.inference.stop_automata import RULE_BRACE, RULE_TOP_LEVEL, RuleTables, rule_tables
from geex_jax.inference.token_choice import SamplingParams, validate_sampling

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Completion:
  """One completion: its final text (cut by the stop rules), tokens, and why it ended."""

  text: str
  tokens: list[int]
  finish_reason: str  # "length", "eos", "stop_rule", "stop_string"
  score: Optional[float] = None  # beam search: the penalised score


def cut_text(
  text: str,
  language: Optional[str] = None,
  stop: Sequence[str] = (),
  at_line_start: bool = True,
  finished: bool = False,
) -> str:
  """The completion text as the reference rules end it: the language rule
  (`stop_rules.truncate`; a prompt ending mid-line keeps its first line), then the first stop
  string (excluded). `finished`: the row has ended, so the brace rule also drops what follows
  its last complete definition (blank lines, an unfinished helper), as the evaluator does."""
  lang = languages.get(language) if language is not None else None
  if lang is not None:
    if lang.stop_rule == RULE_TOP_LEVEL and not at_line_start:
      end = stop_rules.top_level_end(text, at_line_start=False)
      text = text if end is None else text[:end]
    else:
      text = stop_rules.truncate(lang, text)
  cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  text = text[: min(cuts)] if cuts else text
  if finished and lang is not None and lang.stop_rule == RULE_BRACE:
    text = stop_rules.truncate(lang, text, finished=True)
  return text


def _completion(
  text: str,
  tokens: list[int],
  reason: str,
  language: Optional[str],
  stop: Sequence[str],
  at_line_start: bool,
) -> Completion:
  """A sampled row's Completion: its text cut by the rules. The device ends a row on EOS or its
  token budget; where the text rules cut it anyway, the reason names the rule that did."""
  cut = cut_text(text, language, stop, at_line_start, finished=True)
  if reason in ("length", "eos"):
    if cut_text(text, language, (), at_line_start) != text:
      reason = "stop_rule"
    elif cut_text(text, None, stop) != text:
      reason = "stop_string"
  return Completion(cut, tokens, reason)


def _ends_line(prompt: str) -> bool:
  """Whether a completion of `prompt` starts at the beginning of a line (the rules' start)."""
  return prompt.endswith("\n") or prompt == ""


def _per_prompt(language, count: int) -> list[Optional[str]]:
  """`language` (None, one name, or one name or None per prompt) as one entry per prompt."""
  langs = [language] * count if language is None or isinstance(language, str) else list(language)
  if len(langs) != count:
    raise InputError(f"{len(langs)} languages for {count} prompts")
  return langs


def _stable_length(
  text: str, language: Optional[str], at_line_start: bool, stop: Sequence[str]
) -> int:
  """How much of an unfinished completion's cut text can no longer change (streaming)."""
  n = len(text)
  while n and text[n - 1] == "\ufffd":  # maybe half of a multi-byte character
    n -= 1
  if stop:
    n = min(n, len(text) - max(len(s) for s in stop) + 1)
  if language is not None:
    # The language rule may still cut from here (a new top-level line, an unfinished helper).
    undecided = stop_rules.undecided_from(language, text, at_line_start)
    if undecided is not None:
      n = min(n, undecided)
  return max(n, 0)


class Sampler:
  """A loaded model + tokenizer that turns prompts into completions.

  >>> s = Sampler.load("ckpt/", "codegeex_tokenizer/", dtype="bf16", int8=True)
  >>> s.complete(["def add(a, b):\\n"], n=2, temperature=0.8, top_p=0.95, language="python")
  [['    return a + b\\n', ...]]
  """

  def __init__(
    self,
    config: M.CodeGeeXConfig,
    params: Any,
    tokenizer,
    *,
    mesh=None,
    max_batch: int = 32,
    steps_per_loop: int = 1,
  ):
    if tokenizer.vocab_size > config.vocab_size:
      raise InputError(
        f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
        f"{config.vocab_size}; wrong --tokenizer for this checkpoint?"
      )
    if config.scan_layers:
      # Decode with the layers unrolled: with a scanned stack XLA slices every layer's weights
      # out of the stacked arrays each step; unrolled, 13B bf16 batch-1 decode on an H200 went
      # from 19.8 to 7.4 ms/token (BENCHMARKS.md, Sampling).
      params = M.convert_layout(params, config, False)
      config = config.replace(scan_layers=False)
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.max_batch = max_batch
    self.steps_per_loop = steps_per_loop  # see DecodeSpec

  @classmethod
  def load(
    cls,
    checkpoint,
    tokenizer=None,
    *,
    dtype: str = "fp32",
    int8: bool = False,
    mesh=None,
    max_batch: int = 32,
  ) -> "Sampler":
    """Restores a geex-jax checkpoint (converted or trained): `checkpoint` is a local directory
    or a gs:// URL (read through geex_jax.model.checkpoints; fileio.as_path decides which).

    tokenizer: a directory (local or gs://) of the released tokenizer files, a tokenizer
      object, or None for the byte-level fallback. dtype: "fp32" | "bf16" (params and compute).
      int8: quantize the blocks' linears (weight-only). mesh: shard weights over its `model`
      axis (tensor parallel).
    """
    from geex_jax import tokenizer as tok
    from geex_jax.model import checkpoints

    try:
      compute = M.as_dtype(dtype)
    except ValueError as e:
      raise InputError(str(e)) from None
    # Restored unrolled directly (see __init__): no stacking then unstacking.
    config, params = checkpoints.load_params(checkpoint, dtype=compute, scan_layers=False)
    config = config.replace(
      dtype=compute.name, param_dtype=compute.name, dropout_rate=0.0, remat_policy="none"
    )
    if int8:
      params = jax.jit(quantization.quantize_params)(params)
    if mesh is not None:
      from geex_jax.model import partitioning

      specs = (
        quantization.quantized_logical_specs(config) if int8 else M.param_logical_specs(config)
      )
      params = partitioning.shard_params(params, specs, mesh)
    tokenizer = tok.as_tokenizer(tokenizer)
    return cls(config, params, tokenizer, mesh=mesh, max_batch=max_batch)

  # -- helpers -------------------------------------------------------------------------------

  def prompt_text(self, prompt: str, language: Optional[str], add_tag: bool = True) -> str:
    """The text the model sees: the language tag line + prompt when a language is given."""
    if language is None or not add_tag:
      return prompt
    return languages.get(language).tag + "\n" + prompt

  def _encode(self, prompt: str, language: Optional[str], add_tag: bool) -> list[int]:
    ids = self.tokenizer.encode(self.prompt_text(prompt, language, add_tag))
    if not ids:
      raise InputError("empty prompt: give at least one character of text")
    if len(ids) >= self.config.max_position:
      raise InputError(
        f"prompt has {len(ids)} tokens; the model reads at most "
        f"{self.config.max_position - 1} before generating"
      )
    return ids

  def _rule(self, language: Optional[str]) -> RuleTables:
    kind = languages.get(language).stop_rule if language else None
    return rule_tables(self.tokenizer, kind, self.config.vocab_size)

  def _fit_new_tokens(self, ids: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    room = self.config.max_position - max(len(i) for i in ids)
    if room < max_new_tokens:
      log.warning(
        "max_new_tokens %d lowered to %d: the prompt leaves no more room in the "
        "model's %d positions",
        max_new_tokens,
        room,
        self.config.max_position,
      )
    return min(max_new_tokens, room)

  # -- sampling ------------------------------------------------------------------------------

  def complete_detailed(
    self,
    prompts: Sequence[str],
    n: int = 1,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    max_new_tokens: int = 256,
    language=None,
    stop: Sequence[str] = (),
    seed: int = 0,
    add_tag: bool = True,
  ) -> list[list[Completion]]:
    """n completions of each prompt, as `Completion`s ([P][n]).

    language: None, one name for all prompts, or one name (or None) per prompt; it selects the
      tag line (when add_tag) and the stop rule. Seeds: sample j of prompt i uses row id
      i * n + j, so results do not depend on max_batch.
    """
    sampling = SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    validate_sampling(temperature, top_k, top_p, max_new_tokens=max_new_tokens, num_samples=n)
    langs = _per_prompt(language, len(prompts))
    ids = [self._encode(p, l, add_tag) for p, l in zip(prompts, langs)]
    at_start = [_ends_line(p) for p in prompts]
    results: list[list[Completion]] = [[] for _ in prompts]
    # Batches: prompts with the same stop rule, ceil(max_batch / n) prompts at a time; with
    # n > max_batch a prompt's samples are drawn in rounds of max_batch rows.
    by_rule: dict[str, list[int]] = {}
    for i, l in enumerate(langs):
      by_rule.setdefault(self._rule(l).kind, []).append(i)
    per_batch = max(1, self.max_batch // n)
    rounds = (
      [(0, n)]
      if n <= self.max_batch
      else [(j, min(self.max_batch, n - j)) for j in range(0, n, self.max_batch)]
    )
    for kind, members in by_rule.items():
      rule = self._rule(langs[members[0]])
      for k in range(0, len(members), per_batch):
        group = members[k : k + per_batch]
        new = self._fit_new_tokens([ids[i] for i in group], max_new_tokens)
        for first, count in rounds:
          row_ids = [i * n + first + j for i in group for j in range(count)]
          row_lang = [langs[i] for i in group for _ in range(count)]
          row_start = [at_start[i] for i in group for _ in range(count)]
          check = self._host_check(row_lang, row_start, stop)
          gen = generate_ids(
            self.config,
            self.params,
            [ids[i] for i in group],
            sampling=sampling,
            max_new_tokens=new,
            num_samples=count,
            seed=seed,
            eos_id=self.tokenizer.eos_id,
            vocab_limit=self.tokenizer.vocab_size,
            rule=rule,
            at_line_start=[at_start[i] for i in group],
            row_ids=row_ids,
            host_check=check,
            mesh=self.mesh,
            steps_per_loop=self.steps_per_loop,
          )
          for r, (toks, reason) in enumerate(zip(gen.tokens, gen.reasons)):
            results[group[r // count]].append(
              _completion(
                self.tokenizer.decode(toks), toks, reason, row_lang[r], stop, row_start[r]
              )
            )
    return results

  def _host_check(self, row_lang, row_start, stop) -> Optional[HostCheck]:
    """Between chunks: stop a row on a stop string, or when the exact text rule fires (a safety
    net for the rare case the byte automaton fires later, see `stop_automata._top_level_next`)."""
    if not stop and not any(row_lang):
      return None
    decode = self.tokenizer.decode

    def check(r: int, toks: list[int]) -> bool:
      if not toks:
        return False
      text = decode(toks)
      return cut_text(text, row_lang[r], stop, row_start[r]) != text

    return check

  def complete(
    self,
    prompts: Sequence[str],
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    language=None,
    **kwargs,
  ) -> list[list[str]]:
    """n completion texts per prompt ([P][n]), cut by the language rule and stop strings.

    The evaluator's entry point. kwargs: top_k, greedy, stop, seed, add_tag (see
    `complete_detailed`). temperature 0 is greedy.
    """
    out = self.complete_detailed(
      prompts,
      n,
      temperature=temperature,
      top_p=top_p,
      max_new_tokens=max_new_tokens,
      language=language,
      **kwargs,
    )
    return [[c.text for c in row] for row in out]

  def beam(
    self,
    prompts: Sequence[str],
    width: int,
    *,
    n: Optional[int] = None,
    length_penalty: float = 1.0,
    max_new_tokens: int = 256,
    language=None,
    stop: Sequence[str] = (),
    add_tag: bool = True,
  ) -> list[list[Completion]]:
    """Beam search: the n (default width) best beams per prompt, best first, with scores."""
    validate_sampling(beam=width, max_new_tokens=max_new_tokens)
    n = width if n is None else n
    if not 1 <= n <= width:
      raise InputError(f"num_samples {n} must be between 1 and the beam width {width}")
    out: list[list[Completion]] = []
    for prompt, lang in zip(prompts, _per_prompt(language, len(prompts))):
      ids = self._encode(prompt, lang, add_tag)
      at_start = _ends_line(prompt)
      res = beam_search_ids(
        self.config,
        self.params,
        [ids],
        width=width,
        max_new_tokens=self._fit_new_tokens([ids], max_new_tokens),
        length_penalty=length_penalty,
        eos_id=self.tokenizer.eos_id,
        vocab_limit=self.tokenizer.vocab_size,
        rule=self._rule(lang),
        at_line_start=[at_start],
        mesh=self.mesh,
      )
      row = []
      for toks, score, ended in zip(res.tokens[0][:n], res.scores[0][:n], res.ended[0][:n]):
        text = self.tokenizer.decode(toks)
        cut = cut_text(text, lang, stop, at_start)
        reason = (
          "stop_string"
          if cut != cut_text(text, lang, (), at_start)
          else ("eos" if ended else "length")
        )
        row.append(Completion(cut, toks, reason, score))
      out.append(row)
    return out

  def stream(
    self,
    prompt: str,
    write: Callable[[str], Any],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    max_new_tokens: int = 256,
    language: Optional[str] = None,
    stop: Sequence[str] = (),
    seed: int = 0,
    add_tag: bool = True,
    chunk_size: int = 4,
  ) -> Completion:
    """Samples one completion of one prompt, passing text to `write` as soon as it is final.

    The concatenation of everything written equals the returned Completion.text.
    """
    sampling = SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = self._encode(prompt, language, add_tag)
    at_start = _ends_line(prompt)
    rule = self._rule(language)
    emitted = 0
    decode = self.tokenizer.decode

    def on_chunk(tokens, lengths):
      nonlocal emitted
      text = cut_text(decode(tokens[0, : lengths[0]].tolist()), language, stop, at_start)
      upto = _stable_length(text, language, at_start, stop)
      if upto > emitted:
        write(text[emitted:upto])
        emitted = upto

    gen = generate_ids(
      self.config,
      self.params,
      [ids],
      sampling=sampling,
      max_new_tokens=self._fit_new_tokens([ids], max_new_tokens),
      seed=seed,
      eos_id=self.tokenizer.eos_id,
      vocab_limit=self.tokenizer.vocab_size,
      rule=rule,
      at_line_start=[at_start],
      host_check=self._host_check([language], [at_start], stop),
      on_chunk=on_chunk,
      chunk_size=chunk_size,
      mesh=self.mesh,
      steps_per_loop=self.steps_per_loop,
    )
    done = _completion(
      decode(gen.tokens[0]), gen.tokens[0], gen.reasons[0], language, stop, at_start
    )
    if len(done.text) > emitted:
      write(done.text[emitted:])
    return done
