"""Shared building blocks: norms, rotary embeddings, attention (+ KV cache), MLP."""
