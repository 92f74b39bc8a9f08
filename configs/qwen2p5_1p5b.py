"""Qwen2.5-1.5B dimensions (28 layers, 1536 wide, 12/2 heads, MLP 8960, vocab 151936, tied
embeddings): the benchmark size for a single GPU. ``get_config("4096")`` sets seq_len 4096."""
from vita_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.llm.update(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True)
    c.dtype = "bfloat16"
    c.remat_policy = "dots_no_batch"
    c.bench.update(batch=8, seq_len=int(arg) if arg else 2048, steps=5, decode_tokens=128, prompt_len=128)
    return c
