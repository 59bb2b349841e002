"""Mixture rates: the paper's language shares of the CodeGeeX corpus, overridable from gin."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import gin

from geex_jax import languages as langs
from geex_jax.errors import ConfigError

# Paper §5: the 13 "other" languages share 3.10% of the corpus; the paper gives no split, so each
# gets an equal 3.10/13 %. Languages the release tags beyond the paper's 23 get the same share.
OTHER_SHARE = 3.10
_OTHER_LANGUAGES = tuple(l.name for l in langs.LANGUAGES if not l.corpus_share)
_PAPER_OTHERS = tuple(n for n in _OTHER_LANGUAGES if n in langs.PAPER_LANGUAGES)


def paper_share(name: str) -> float:
  """Percent of the CodeGeeX corpus for a language (registry share, or the equal 'other' split)."""
  lang = langs.get(name)
  return lang.corpus_share or OTHER_SHARE / len(_PAPER_OTHERS)


@gin.configurable("language_rates", denylist=["language_names"])
def language_rates(
  language_names: Sequence[str], overrides: Optional[Mapping[str, float]] = None
) -> dict[str, float]:
  """Sampling rates (normalised to sum 1) for the languages present in a corpus.

  Args:
    language_names: the corpus's languages.
    overrides: {language name or alias: weight} replacing the paper's share of those languages
      (weights need not sum to anything; 0 removes a language from the mixture).
  """
  weights = {n: paper_share(n) for n in language_names}
  for key, w in (overrides or {}).items():
    try:
      name = langs.get(key).name
    except langs.UnknownLanguageError as e:
      raise ConfigError(f"language_rates.overrides: {e}") from None
    if w < 0:
      raise ConfigError(f"language_rates.overrides: negative weight {w} for {name}")
    if name in weights:
      weights[name] = float(w)
  total = sum(weights.values())
  if total <= 0:
    raise ConfigError("mixture rates are all zero")
  return {n: w / total for n, w in weights.items() if w > 0}
