"""Model FLOPs of one training step, MaxText's way: matmul parameters x tokens x 2 per forward, the
embedding gather not counted, causal attention 4·B·S²·H·D/2; a module that is differentiated costs
3x its forward (forward + backward), a frozen tower below every trainable module 1x (forward only)."""
from __future__ import annotations

import re

from vita_jax import config as config_lib


def _trained(config, prefix: str) -> bool:
    return any(re.fullmatch(p, prefix + "x") or p.startswith(prefix) for p in config.trainable)


def step_flops(config, batch_size: int, seq_len: int, tiles: int = 0, audio_frames: int = 0) -> float:
    """``tiles``: ViT tiles per step; ``audio_frames``: fbank frames per step (all clips)."""
    lc = config_lib.llm_config(config)
    e, m, h, k, d, n = (lc.hidden_size, lc.intermediate_size, lc.num_attention_heads, lc.num_key_value_heads,
                        lc.dim_head, lc.num_hidden_layers)
    llm_params = n * (e * (h + 2 * k) * d + h * d * e + 3 * e * m) + e * lc.vocab_size
    llm = 2 * llm_params * batch_size * seq_len + n * 4 * batch_size * seq_len ** 2 * h * d / 2
    # the LLM is differentiated whenever anything trains (everything trainable sits below or in it),
    # except the CTC stage, which does not use it
    total = 0.0 if config.loss == "ctc" else 3 * llm
    vc = config_lib.vision_config(config)
    if vc is not None and tiles:
        t = (vc.image_size // vc.patch_size) ** 2 + 1
        c, mm = vc.hidden_size, vc.intermediate_size
        vit = tiles * (2 * vc.num_hidden_layers * (4 * c * c + 2 * c * mm) * t + vc.num_hidden_layers * 4 * t * t * c)
        proj_in = 4 * c
        proj = tiles * (t // 4) * 2 * (proj_in * e + e * e)
        total += vit * (3 if _trained(config, "vision_tower/") else 1) + 3 * proj
    ac = config_lib.audio_config(config)
    if ac is not None and audio_frames:
        t = audio_frames / 4
        c, ff = ac.attention_dim, ac.linear_units
        enc = 2 * t * ac.num_blocks * (5 * c * c + 2 * c * ff) + ac.num_blocks * 4 * t * t * c / max(1, audio_frames // 400)
        adp = (t / 2) * 2 * (ac.kernel_size * c * 2 * c + 2 * c * e)
        total += enc * (3 if _trained(config, "audio_encoder/encoder/") else 1) + adp * (
            3 if _trained(config, "audio_encoder/adpter/") or _trained(config, "llm/") else 1)
    return float(total)
