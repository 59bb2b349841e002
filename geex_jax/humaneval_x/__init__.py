"""HumanEval-X evaluation: problems, program assembly, sandboxed parallel execution, pass@k.

Modules: problems (dataset, prompts), assembly (programs from dataset code + cleaned completion),
sandbox (bubblewrap + rlimits), toolchains (per-language compile/run drivers), executor (parallel,
cached verdicts), metrics (pass@k, budget allocation), evaluate (samples -> results, self-test),
generate (sampler -> samples JSONL), report (Markdown, PNG), cli (`geex-eval`).
"""
