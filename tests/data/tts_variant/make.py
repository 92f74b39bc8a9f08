"""Makes a second speech-decoder fixture with the official code: ``decoder/{model.json,final.pt}`` of other
dimensions and seed than ``../shared/fixtures/vita15-tiny/vita_tts_ckpt``, and ``reference.npz`` of the
official ``LLM2TTSCodecAR.infer`` in each decoding mode (greedy, repetition penalty, top-k), chosen so that
a special id other than EOS (``odim``, ``odim+1`` or ``odim+3``) is drawn: the official loop yields it and
goes on; only EOS (``odim+2``) ends it.

    python tests/data/tts_variant/make.py --vita PATH/TO/VITA [--check-shared DIR]

``--vita``: a checkout of the official VITA repository (``vita/model/vita_tts/decoder/decoder.py``), run
with torch 2.13 (CPU) and transformers 4.44.2, as the shared fixture was. ``--check-shared`` first
reproduces the shared fixture's greedy and penalty codes with the same code (a check of the set-up).
Not run by the tests (they read the committed outputs); the official code is not part of this project.
"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# dimensions other than the shared fixture's (idim 16, odim 64, 4 heads, 4 blocks, 64 units)
CONFIG = dict(idim=24, odim=40, transformer_attention_dim=24, transformer_attention_heads=3,
              transformer_linear_units=40, transformer_num_blocks=2, transformer_dropout_rate=0.1,
              encoder_input_dim=24, encoder_output_dim=24, encoder_drop_rate=0.1, encoder_criterion="ce",
              kv_cache_prefix_finetune=0, encoder_pre_norm_type="ln", encoder_upsample_rate=9)
# decoding modes: (name, top_k, penalty window, penalty, torch seed of the draws)
MODES = [("greedy", 1, -1, 1.1, 0), ("penalty", 1, 5, 1.1, 0), ("topk2", 2, -1, 1.1, 7),
         ("topk3_penalty", 3, 4, 1.3, 11)]
MAX_TOKENS = 40


def official(vita: str):
    sys.path.insert(0, vita)
    from vita.model.vita_tts.decoder.decoder import LLM2TTSCodecAR  # noqa: E402  (the official module)
    return LLM2TTSCodecAR


def build(cls, args: dict, state=None):
    model = cls(args["idim"], args["odim"], SimpleNamespace(**args))
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def run(model, hidden: np.ndarray, top_k: int, window: int, penalty: float, seed: int) -> dict:
    """Every drawn id (EOS included when drawn), the yielded ids, and the distribution handed to
    ``torch.multinomial`` at each step (recorded by a call-through wrapper)."""
    drawn, probs, real = [], [], torch.multinomial

    def recording(p, n, *a, **k):
        out = real(p, n, *a, **k)
        probs.append(p.detach().numpy().copy())
        drawn.append(int(out[0]))
        return out

    torch.manual_seed(seed)
    torch.multinomial = recording
    try:
        with torch.no_grad():
            x = torch.from_numpy(hidden).reshape(1, -1, hidden.shape[-1])
            ids = [int(t) for t in model.infer(x, top_k, None, window, penalty,
                                               max_tokens=MAX_TOKENS)]
    finally:
        torch.multinomial = real
    return dict(tokens=np.asarray(ids, np.int64), drawn=np.asarray(drawn, np.int64), probs=np.stack(probs))


def check_shared(cls, folder: str) -> None:
    with open(os.path.join(folder, "decoder", "model.json")) as f:
        args = json.load(f)[2]
    state = torch.load(os.path.join(folder, "decoder", "final.pt"), weights_only=True)["model"]
    model = build(cls, args, state)
    for name, window in (("decoder_infer_greedy", -1), ("decoder_infer_penalty", 5)):
        ref = np.load(os.path.join(folder, "reference", name + ".npz"))
        got = run(model, ref["hidden"].astype(np.float32), 1, window, 1.1, 0)["tokens"]
        assert np.array_equal(got, ref["tokens"]), (name, got, ref["tokens"])
    print("shared fixture reproduced")


def special_inside(out: dict, odim: int) -> bool:
    """A non-EOS special id after a few codes, with codes after it (the official loop goes on)."""
    special = np.nonzero(out["tokens"] >= odim)[0]
    return len(special) > 0 and 4 <= special[0] < len(out["tokens"]) - 2


def make(cls, out_dir: str) -> None:
    """Weights seeded 0, 1, ... until the penalty and a sampling mode draw a non-EOS special id while the
    greedy mode ends on EOS; the decoder's output layer is scaled so that its logits spread over a few
    nats (random init gives nearly flat distributions, on which greedy decoding would hinge on rounding)."""
    odim = CONFIG["odim"]
    for seed in range(2000):
        torch.manual_seed(seed)
        model = build(official_cls, CONFIG)
        with torch.no_grad():
            model.out_fnn.weight.mul_(8.0)
        hidden = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(9, CONFIG["idim"], generator=hidden).numpy()
        outs = {name: run(model, x, k, w, p, s) for name, k, w, p, s in MODES}
        greedy = outs["greedy"]["tokens"]
        greedy_ok = len(greedy) >= 8 and (greedy < odim).all()
        if special_inside(outs["penalty"], odim) and special_inside(outs["topk3_penalty"], odim) and greedy_ok:
            break
    else:
        raise SystemExit("no seed drew a special id")
    os.makedirs(os.path.join(out_dir, "decoder"), exist_ok=True)
    with open(os.path.join(out_dir, "decoder", "model.json"), "w") as f:
        json.dump([CONFIG["idim"], CONFIG["odim"], CONFIG], f, indent=1)
    torch.save({"model": model.state_dict()}, os.path.join(out_dir, "decoder", "final.pt"))
    arrays = {"hidden": x}
    for name, k, w, p, s in MODES:
        arrays.update({f"{name}.{key}": v for key, v in outs[name].items()})
        arrays[f"{name}.settings"] = np.asarray([k, w, p, s], np.float64)
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), **arrays)
    print(f"weights seed {seed}:", {n: outs[n]["tokens"].tolist() for n, *_ in MODES})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vita", required=True)
    ap.add_argument("--check-shared", default=None)
    ap.add_argument("--out", default=HERE)
    a = ap.parse_args()
    official_cls = official(a.vita)
    if a.check_shared:
        check_shared(official_cls, a.check_shared)
    make(official_cls, a.out)
