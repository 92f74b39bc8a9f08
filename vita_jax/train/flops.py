"""Model FLOPs of one training step, MaxText's way, and the device peak table: the one place the
trainer's MFU and the benchmarks (``vita_jax.bench``) take them from.

Matmul parameters x tokens x 2 per forward, the embedding gather not counted, causal attention
4·B·S²·H·D/2; a module that is differentiated costs 3x its forward (forward + backward), a frozen
tower below every trainable module 1x (forward only)."""
from __future__ import annotations

import re

from vita_jax.models import qwen2, vita

# dense bf16 peak FLOP/s and HBM bytes/s per device (vendor figures); matched by substring of
# jax's device_kind, first match wins. Sources, the vendors' spec sheets (NVIDIA quotes bf16 "with sparsity":
# dense is half): NVIDIA H100 Tensor Core GPU datasheet (SXM 989 TFLOP/s dense, 3.35 TB/s; PCIe 756, 2.0 TB/s);
# NVIDIA H200 datasheet (989, 4.8 TB/s); NVIDIA A100 datasheet (312; 80 GB SXM 2.039 TB/s, 40 GB 1.555 TB/s);
# NVIDIA L4 datasheet (121, 300 GB/s); Google Cloud TPU system architecture pages, per chip: v6e 918 TFLOP/s,
# 1640 GB/s; v5e ("TPU v5 lite") 197, 819 GB/s; v5p 459, 2765 GB/s; v4 275, 1200 GB/s.
PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100-PCIE-40GB", 312e12, 1.555e12),
    ("A100", 312e12, 2.039e12),
    ("L4", 121e12, 0.3e12),
    ("TPU v6", 918e12, 1.64e12),
    ("TPU v5 lite", 197e12, 0.819e12),
    ("TPU v5e", 197e12, 0.819e12),
    ("TPU v5", 459e12, 2.765e12),
    ("TPU v4", 275e12, 1.2e12),
)


def device_peaks(kind: str, override_tflops: float = 0.0, override_gbps: float = 0.0):
    """``(peak FLOP/s, HBM bytes/s)`` of one device of ``kind`` (None when unknown); overrides in
    TFLOP/s and GB/s win."""
    peak, bw = None, None
    for sub, p, b in PEAKS:
        if sub.lower() in kind.lower():
            peak, bw = p, b
            break
    if override_tflops:
        peak = override_tflops * 1e12
    if override_gbps:
        bw = override_gbps * 1e9
    return peak, bw


def llm_forward_flops(cfg: qwen2.Qwen2Config, batch: int, seq: int) -> float:
    """One forward of the LLM over ``batch`` x ``seq`` tokens: matmuls + causal attention."""
    e, m, h, k, d, n = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.dim_head, cfg.num_hidden_layers)
    matmul_params = n * (e * (h + 2 * k) * d + h * d * e + 3 * e * m) + e * cfg.vocab_size
    return 2 * matmul_params * batch * seq + n * 4 * batch * seq * seq * h * d / 2


def training_flops(cfg: qwen2.Qwen2Config, batch: int, seq: int) -> float:
    """Model FLOPs of one LLM-only training step (forward + backward), MaxText's accounting."""
    return 3 * llm_forward_flops(cfg, batch, seq)


def _trained(config, prefix: str) -> bool:
    return any(re.fullmatch(p, prefix + "x") or p.startswith(prefix) for p in config.trainable)


def step_flops(config, batch_size: int, seq_len: int, tiles: int = 0, audio_frames: int = 0) -> float:
    """``tiles``: ViT tiles per step; ``audio_frames``: fbank frames per step (all clips)."""
    lc = vita.llm_config(config)
    e = lc.hidden_size
    llm = llm_forward_flops(lc, batch_size, seq_len)
    # the LLM is differentiated whenever anything trains (everything trainable sits below or in it),
    # except the CTC stage, which does not use it
    total = 0.0 if config.loss == "ctc" else 3 * llm
    vc = vita.vision_config(config)
    if vc is not None and tiles:
        t = (vc.image_size // vc.patch_size) ** 2 + 1
        c, mm = vc.hidden_size, vc.intermediate_size
        vit = tiles * (2 * vc.num_hidden_layers * (4 * c * c + 2 * c * mm) * t + vc.num_hidden_layers * 4 * t * t * c)
        proj_in = 4 * c
        proj = tiles * (t // 4) * 2 * (proj_in * e + e * e)
        total += vit * (3 if _trained(config, "vision_tower/") else 1) + 3 * proj
    ac = vita.audio_config(config)
    if ac is not None and audio_frames:
        t = audio_frames / 4
        c, ff = ac.attention_dim, ac.linear_units
        enc = (2 * t * ac.num_blocks * (5 * c * c + 2 * c * ff)
               + ac.num_blocks * 4 * t * t * c / max(1, audio_frames // 400))
        adp = (t / 2) * 2 * (ac.kernel_size * c * 2 * c + 2 * c * e)
        total += enc * (3 if _trained(config, "audio_encoder/encoder/") else 1) + adp * (
            3 if _trained(config, "audio_encoder/adpter/") or _trained(config, "llm/") else 1)
    return float(total)
