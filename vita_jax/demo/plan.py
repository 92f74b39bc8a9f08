"""The demo's plan: its stages in order, what each trains and how it is scored, and their steps at a
budget (``vita-jax demo --budget-minutes N``)."""
from __future__ import annotations

# stage -> (what it trains, metric, higher_is_better, steps at the 15-minute budget, learning rate,
#           media slots per sample (tiles, clips)). Stages whose LLM is frozen and whose only trainable part is
#           a small adapter are scored by what a few hundred CPU steps move clearly: 1.1 by token accuracy (the
#           colour and shape words); 2.1b by the held-out transcripts' NLL (the adapter maps speech into the
#           frozen LLM's input space: 1.5-2.7 nats less over three seeds, while token accuracy gains 0.04-0.24
#           from an LLM that already guesses the phrases' later words, and the first word, which phrase it is,
#           stays beyond this tiny LLM). Exact match, token accuracy and NLL are recorded for every LM stage.
PLAN = {
    "0": ("LLM warm-up on text (stands in for the pretrained Qwen2.5)", "text reply accuracy", True, 800, 3e-3,
          (0, 0)),
    "1.1": ("vision alignment: projector only, captions", "caption token accuracy", True, 300, 3e-3, (1, 0)),
    "1.2": ("vision understanding: ViT + projector + LLM, photos", "photo answer accuracy", True, 300, 5e-3, (1, 0)),
    "1.3": ("vision SFT: questions about scenes", "scene answer accuracy", True, 300, 3e-3, (1, 0)),
    "2.1a": ("speech encoder + CTC head", "CER", False, 200, 5e-3, (0, 1)),
    "2.1b": ("speech adapter: the LLM writes the transcript", "transcript NLL (nats/tok)", False, 250, 1e-2, (0, 1)),
    "2.2": ("audio SFT: spoken questions about images", "spoken-question accuracy", True, 400, 5e-3, (1, 1)),
    # a fine-tune of 2.2's model on one's own data, the way most users adapt VITA-1.5: rank-8 LoRA adapters on the
    # LLM's attention and MLP kernels (base frozen, no optimizer state for it); a side branch: 3.2 goes on from 2.2
    "lora": ("LoRA fine-tune of 2.2's model: answers as whole sentences", "sentence-answer token accuracy", True,
             250, 1e-2, (1, 0)),
    "3.1": ("speech codec (TiCodec GAN) on the bundled recordings", "held-out mel L1", False, 60, 1e-3, (0, 0)),
    "3.2": ("speech decoder (LLM frozen): text -> codec ids", "speech-token accuracy", True, 250, 5e-3, (0, 0)),
}
BATCH = 8
MAX_FRAMES = 192  # 1.9 s of speech: every demo phrase fits


# below these a stage barely moves (measured): a small adapter steering a frozen LLM, new answers. Stage 0 is
# the foundation of the adapter-only stages: at 133 steps its LLM copies words from its context so poorly that
# 1.1's projector gained 0.00-0.07 caption-token accuracy over three seeds; at 400 steps 0.17-0.22
MIN_STEPS = {"0": 400, "1.1": 150, "1.2": 200, "1.3": 100, "2.1a": 120, "2.1b": 200, "2.2": 150, "lora": 60,
             "3.1": 20}
LORA = dict(rank=8, alpha=16.0)  # the LoRA stage's adapters (config.lora; targets: the default q/k/v/o + MLP)
SETUP_MINUTES = 3.0  # data, compilation of eight steps and evaluations, export: paid at any budget


def steps(stage: str, budget_minutes: float) -> int:
    """The stage's steps: its share of what the budget leaves after the fixed set-up cost."""
    scale = max(0.1, (budget_minutes - SETUP_MINUTES) / (15.0 - SETUP_MINUTES))
    return max(MIN_STEPS.get(stage, 20), int(round(PLAN[stage][3] * scale)))


def base_stage(stage: str) -> str:
    """The shipped stage config a demo stage starts from: stage 0 (text warm-up) is 1.3's LM step on text, the
    LoRA stage 2.2's step with adapters."""
    return {"0": "1.3", "lora": "2.2"}.get(stage, stage)
