"""VITA-1.5 at full size: Qwen2.5-7B-Instruct LLM (28 layers, 3584 wide, 28/4 heads, MLP 18944,
vocab 152064, rope theta 1e6, RMSNorm eps 1e-6, untied head), bf16 compute."""
from vita_jax.config import base_config


def get_config(arg=None):
    c = base_config()
    c.llm.update(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, intermediate_size=18944, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False)
    c.dtype = "bfloat16"
    c.remat_policy = "dots_no_batch"
    # InternViT: every layer rematerialised (a row's 13 tiles x 1025 positions kept their attention otherwise):
    # stage 1.2 at 3 rows of 6200 per v5p chip 66.7 GiB, 2 rows 70.9 without it; one more ViT forward, < 3 % of a
    # step's FLOPs (docs/scaling.md)
    c.vision_remat_policy = "full"
    c.bos_token_id = 151643
    c.eos_token_id = 151645
    c.bench.update(batch=8, seq_len=2048, steps=5, decode_tokens=128, prompt_len=128)
    return c
