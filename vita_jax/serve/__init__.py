"""Real-time voice and vision interaction: ``vita-jax serve``.

* :mod:`vita_jax.serve.engine` — one model copy, a fixed batch of decode slots (turns of all
  sessions decode together; a turn joins and leaves without a recompilation), one thread.
* :mod:`vita_jax.serve.session` — one conversation without the network: VAD, turns, streamed text,
  speech synthesis started at the first complete text piece, barge-in, turn metrics.
* :mod:`vita_jax.serve.server` — the asyncio WebSocket server (``/ws``) and the page (``/``).

The Silero VAD itself is inference code: :mod:`vita_jax.infer.vad`.
"""
