"""The README itself: every `geex-*` command line in its code blocks uses flags that the command
really has, and parses completely where the line is not elided with `...` (docs and flags cannot
drift apart)."""

import pathlib
import re
import shlex

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def _parsers():
  from geex_jax.conversion import cli as convert_cli
  from geex_jax.inference import cli as sampling_cli
  from geex_jax.training import cli as train_cli  # noqa: F401  (imported for its gin configurables)
  from geex_jax.data import cli as data_cli
  from geex_jax.humaneval_x import cli as eval_cli
  from geex_jax.serving import cli as serve_cli

  return {
    "geex-sample": sampling_cli.build_parser,
    "geex-eval": eval_cli.build_parser,
    "geex-convert": convert_cli.build_parser,
    "geex-data": data_cli._parser,
    "geex-serve": serve_cli.build_parser,
    "geex-train": None,
  }


def readme_commands() -> list[tuple[int, list[str]]]:
  """(line number, argv) of every geex-* command in README.md's code blocks."""
  commands, block, joined, start = [], False, "", 0
  for number, line in enumerate(README.read_text().splitlines(), 1):
    if line.startswith("```"):
      block = not block
      continue
    if not block:
      continue
    if not joined:
      start = number
    joined += line.rstrip("\\") + " "
    if line.endswith("\\"):
      continue
    text, joined = joined.strip(), ""
    match = re.search(r"\b(geex-(?:train|sample|eval|convert|data|serve))\b", text)
    if match and not text.startswith(("from ", "import ", "#")):
      text = text[match.start() :].replace("$'", "'")
      # `[--flag value]` marks an optional part: check it like the rest.
      commands.append(
        (start, [t.removeprefix("[").removesuffix("]") for t in shlex.split(text, comments=True)])
      )
  return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_script():
  assert {argv[0] for _, argv in COMMANDS} == set(_parsers())


class _ParseError(Exception):
  pass


def _strict(parser):
  """The parser (and its subparsers) raising instead of printing and exiting."""

  def error(message):
    raise _ParseError(message)

  parser.error = error
  for action in parser._actions:
    if isinstance(action.choices, dict):  # subcommands
      for sub in action.choices.values():
        _strict(sub)
  return parser


def _subparser(parser, argv):
  for action in parser._actions:
    choices = getattr(action, "choices", None)
    if isinstance(choices, dict) and argv and argv[0] in choices:
      return choices[argv[0]]
  return parser


@pytest.mark.parametrize("line,argv", COMMANDS, ids=[f"README:{n}" for n, _ in COMMANDS])
def test_readme_command_parses(line, argv):
  prog, args = argv[0], [a for a in argv[1:] if a != "..."]
  elided = "..." in argv[1:]
  if prog == "geex-train":
    from geex_jax.training import cli as train_cli

    try:
      _, bindings = train_cli._parse_args(args)
    except SystemExit as e:
      pytest.fail(f"README line {line}: geex-train rejects {args}: exit {e.code}")
    assert all(" = " in b for b in bindings)
    return
  if prog == "geex-data" and "--" in args:  # what follows a `--` goes to Beam unchanged
    args = args[: args.index("--")]
  parser = _strict(_parsers()[prog]())
  sub = _subparser(parser, args)
  known = {s for action in sub._actions for s in action.option_strings}
  for arg in args:
    if arg.startswith("--"):
      assert arg.split("=")[0] in known, f"README line {line}: {prog} has no flag {arg}"
  if not elided:
    try:
      parser.parse_args(args)
    except _ParseError as e:
      pytest.fail(f"README line {line}: {' '.join(argv)}: {e}")
