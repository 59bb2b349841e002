"""The language stop rules as per-token automata that the decode loop steps on the device.

`geex_jax.stop_rules` says where a completion ends, on text. Checking that on the host every step
would stall the decode loop, so each rule becomes a tiny automaton over the bytes of the
completion, precomputed for every token of the vocabulary (`rule_tables`, once per tokenizer and
rule): inside the loop a step is one gather per row (`rule_step`). The top-level automaton may fire
later than the text rule in rare cases, never earlier; the sampler's host-side text check cuts
those. The brace automaton is the text rule's own (`stop_rules.brace_step`), so it fires exactly
where `stop_rules.is_complete` first holds.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax import stop_rules

Array = jax.Array


RULE_NONE, RULE_TOP_LEVEL, RULE_BRACE = "none", "top_level", "brace"
# States of the top-level (Python) automaton, over the bytes of the completion:
#   AT_START: at the start of a line; INDENTED: the line began with space/tab, it cannot end the
#   completion; OTHER_WS: the line began with other whitespace (\r, \f, ... or a non-ASCII byte),
#   it ends the completion once an ASCII non-space character follows; FIRED: a new top-level line.
AT_START, INDENTED, OTHER_WS, FIRED = 0, 1, 2, 3
_ASCII_WS = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def _top_level_next(state: int, byte: int) -> int:
  if state == FIRED:
    return FIRED
  if byte == 0x0A:
    return AT_START
  if state == INDENTED:
    return INDENTED
  if state == AT_START and byte in (0x20, 0x09):
    return INDENTED
  # Non-ASCII bytes count as "whitespace" here: the automaton may then fire LATER than
  # stop_rules.top_level_end (a line that starts with a non-ASCII letter), never earlier, and the
  # host-side text check catches that rare case.
  if byte in _ASCII_WS or byte >= 0x80:
    return OTHER_WS
  return FIRED


@dataclasses.dataclass(frozen=True, eq=False)
class RuleTables:
  """A language stop rule as per-token tables (built once per tokenizer and rule).

  kind "top_level": table [V, 4] int8, the next automaton state for each (token, state).
  kind "brace": table [V, 1 + Q + 2K + 2] int16 over the encoded states of `stop_rules.brace_step`
  (Q top-level DFA states, K the most a token's running brace count drops): column 0 is the
  token's net `{`-minus-`}` count (a brace-counting state deeper than K only adds 2 * net: no
  token can close its block), columns 1 + q the next state from DFA state q, columns 1 + Q + s
  the next state from brace-counting state s < 2K + 2 (`_brace_table`).
  kind "none": table [1, 1] (unused).
  """

  kind: str
  table: np.ndarray


NO_RULE = RuleTables(RULE_NONE, np.zeros((1, 1), np.int32))  # a language without a stop rule


def token_bytes(tokenizer, vocab_size: int) -> list[bytes]:
  """UTF-8 bytes of every id < vocab_size (b"" for ids the tokenizer cannot decode and for EOS).

  Decoding one id at a time replaces split multi-byte characters with U+FFFD, which keeps every
  ASCII byte: the rules only look at ASCII bytes (newline, space, tab, braces).
  """
  out = []
  for i in range(vocab_size):
    if i == tokenizer.eos_id or i >= tokenizer.vocab_size:
      out.append(b"")
      continue
    try:
      out.append(tokenizer.decode([i]).encode("utf-8"))
    except Exception:  # an id the tokenizer leaves undefined
      out.append(b"")
  return out


_RULE_CACHE: dict = {}


def rule_tables(tokenizer, stop_rule: Optional[str], vocab_size: int) -> RuleTables:
  """The device tables of a registry stop rule ("top_level", "brace" or None) for a tokenizer."""
  kind = stop_rule or RULE_NONE
  if kind == RULE_NONE:
    return NO_RULE
  key = (id(tokenizer), kind, vocab_size)
  if key in _RULE_CACHE:
    return _RULE_CACHE[key][1]
  pieces = token_bytes(tokenizer, vocab_size)
  if kind == RULE_TOP_LEVEL:
    table = np.empty((vocab_size, 4), np.int8)
    for i, piece in enumerate(pieces):
      for s in range(4):
        state = s
        for byte in piece:
          state = _top_level_next(state, byte)
          if state == FIRED:
            break
        table[i, s] = state
  elif kind == RULE_BRACE:
    table = _brace_table(pieces)
  else:
    raise ValueError(f"unknown stop rule {stop_rule!r}")
  tables = RuleTables(kind, table)
  _RULE_CACHE[key] = (tokenizer, tables)  # keeps the tokenizer alive so its id stays unique
  return tables


_BRACE_Q = len(stop_rules.BRACE_STATES)  # DFA states of the brace rule's top level


def _brace_table(pieces: list[bytes]) -> np.ndarray:
  """The brace rule's per-token table (see RuleTables), by running `stop_rules.brace_step` over
  every token's bytes from every start state that the token can move other than by its net."""
  q = _BRACE_Q
  net = np.zeros(len(pieces), np.int64)
  k = 1
  for i, piece in enumerate(pieces):
    if b"{" in piece or b"}" in piece:
      depth = low = 0
      for byte in piece:
        depth += (byte == 0x7B) - (byte == 0x7D)
        low = min(low, depth)
      net[i], k = depth, max(k, -low)
  longest = max((len(p) for p in pieces), default=0)
  # Every state reachable inside one token from a start column: DFA states (encoded -q..-1) and
  # brace counts up to 2 * (k + longest) + 1. Index = encoded state + q; byte 256 = padding.
  top = 2 * (k + longest) + 2
  if top >= 2**15:
    raise ValueError(f"a token of {longest} bytes: too long for the int16 brace table")
  n = q + top
  step = np.empty((n, 257), np.int64)
  for idx in range(n):
    s = idx - q
    by_class = [stop_rules.brace_step(s, c) for c in range(stop_rules.NON_ASCII + 1)]
    row = by_class[:128] + [by_class[stop_rules.NON_ASCII]] * 128 + [s]
    step[idx] = np.minimum(np.asarray(row), top - 1) + q  # (the clip is never reached)
  starts = np.concatenate([-1 - np.arange(q), np.arange(2 * k + 2)]) + q  # column states
  states = np.tile(starts, (len(pieces), 1))
  order = np.argsort([-len(p) for p in pieces], kind="stable")
  lengths = np.array([len(pieces[i]) for i in order])
  data = np.full((len(pieces), max(longest, 1)), 256, np.int64)
  for row, i in enumerate(order):
    data[row, : len(pieces[i])] = np.frombuffer(pieces[i], np.uint8)
  sorted_states = states[order]
  for j in range(longest):
    active = int((lengths > j).sum())  # the longest tokens come first
    sorted_states[:active] = step[sorted_states[:active], data[:active, j : j + 1]]
  states[order] = sorted_states
  table = np.concatenate([net[:, None], states - q], axis=1)
  return table.astype(np.int16)


def _brace_step(table: Array, state: Array, tokens: Array) -> tuple[Array, Array]:
  """One token of the brace automaton per row (encoded states of `stop_rules.brace_step`)."""
  near_end = table.shape[1] - 1 - _BRACE_Q  # brace-counting states 0 .. near_end - 1 are looked up
  in_dfa = state < 0
  near = (state >= 0) & (state < near_end)
  col = jnp.where(in_dfa, -state, jnp.where(near, 1 + _BRACE_Q + state, 0))
  looked = table[tokens, col].astype(jnp.int32)
  new = jnp.where(in_dfa | near, looked, state + 2 * looked)
  return new, new == stop_rules.BRACE_FIRED


def rule_step(kind: str, table: Array, state: Array, tokens: Array) -> tuple[Array, Array]:
  """Advances the automaton by one token per row. state, tokens: [B] -> (state [B], fired [B])."""
  if kind == RULE_TOP_LEVEL:
    state = table[tokens, state].astype(jnp.int32)
    return state, state == FIRED
  if kind == RULE_BRACE:
    return _brace_step(table, state, tokens)
  return state, jnp.zeros(state.shape, bool)


def rule_initial_state(kind: str, at_line_start: bool) -> int:
  """The automaton state before the first new token. A prompt that ends mid-line continues that
  line, which then cannot be a new top-level line (INDENTED blocks it until the next newline)."""
  if kind == RULE_TOP_LEVEL:
    return AT_START if at_line_start else INDENTED
  if kind == RULE_BRACE:
    return stop_rules.BRACE_INITIAL
  return 0
