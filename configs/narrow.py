"""VITA-1.5's full-size shapes with every tower narrow and shallow (2 layers, 64-128 wide), what a CPU runs
at the stages' real data shapes (their ``:narrow`` variants): the real 152,064-entry vocabulary and token ids,
448-px tiles of 14-px patches (256 tokens a tile after the pixel shuffle), 80-bin fbanks; fp32 compute."""
from vita_jax.config import load_config


def get_config(arg=None):
    c = load_config("vita15")
    c.llm.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128)
    c.vision.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    c.mm_hidden_size = 256  # 4 x the ViT's width (pixel shuffle)
    c.mm_vision_tower = "InternViT-narrow"          # local folders, written on export
    c.mm_audio_encoder = "audio-encoder-narrow"
    c.audio.update(attention_dim=64, attention_heads=4, linear_units=128, num_blocks=2, llm_embed_dim=128)
    c.dtype = "float32"  # CPUs compute bf16 slower than fp32
    return c
