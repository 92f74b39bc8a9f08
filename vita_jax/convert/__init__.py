"""Checkpoint conversion: key tables (next to each model), safetensors / .pt readers and writers,
and loading tensor by tensor into a (sharded) Flax tree."""
