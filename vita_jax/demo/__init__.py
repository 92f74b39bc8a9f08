"""The embedded demo: every stage of the VITA-1.5 curriculum on a tiny model, on CPU, offline
(``vita-jax demo``, see :mod:`vita_jax.demo.run`)."""
from vita_jax.demo.evaluate import format_summary  # noqa: F401
from vita_jax.demo.run import Demo, run_demo  # noqa: F401
