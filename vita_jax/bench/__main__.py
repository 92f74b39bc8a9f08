"""``python -m vita_jax.bench WHAT --config=...``."""
import sys

from vita_jax.bench import main

sys.exit(main())
