"""The embedded demo: every stage of the VITA-1.5 curriculum on a tiny model, on CPU, offline
(``vita-jax demo``, see :mod:`vita_jax.demo.run`)."""
from vita_jax.demo.run import Demo, format_summary, run_demo  # noqa: F401
