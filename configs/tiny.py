"""Tiny Qwen2 (the shape of ../shared/fixtures/vita15-tiny's LLM): for tests and CPU smoke runs."""
from vita_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.llm.update(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128)
    c.vision.update(image_size=56, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128)
    c.mm_hidden_size = 256
    c.mm_vision_tower = "InternViT-tiny"          # local folders, written on export
    c.mm_audio_encoder = "audio-encoder-tiny"
    c.image.update(size=56, crop_size=56, max_dynamic_patch=6)
    c.audio.update(attention_dim=32, attention_heads=4, linear_units=64, num_blocks=2, llm_embed_dim=64)
    c.bench.update(batch=4, seq_len=128, steps=5, decode_tokens=32, prompt_len=16)
    return c
