"""`python -m geex_jax.training` = `geex-train`."""

from geex_jax.training.cli import main

raise SystemExit(main())
