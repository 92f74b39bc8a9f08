"""The project's configs (``get_config(arg)`` files), installed with the package as ``vita_jax.configs``: a
name on the command line (``--config=stage2_2:tiny``) is the file of that name here. Read as files, by
:func:`vita_jax.config.load_config`, not imported as modules."""
