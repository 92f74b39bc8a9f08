"""Generator of ``tests/data/vita_variant`` (issue #24): a second tiny VITA-1.5, of other dimensions than the
shared ``vita15-tiny`` fixture, written in the official release layout, and the official PyTorch code's outputs
on a batch of its own (``tests/test_models_vita_variant.py`` compares vita_jax with them).

Not part of the test suite, and the official code is never copied into the project: this script imports it
from a checkout given by ``--vita`` (github.com/VITA-MLLM/VITA, commit 35d064a). Needs torch,
transformers 4.44.2, timm, torchvision (its pure-Python classes only), safetensors, pyyaml, pillow, soundfile::

    PYTHONPATH=/path/to/transformers-4.44.2:/path/to/timm-and-torchvision \\
        python tests/data/vita_variant/make.py --vita /path/to/VITA --kaldi /path/to/torchaudio/compliance/kaldi.py

``--kaldi``: torchaudio 2.11.0's unchanged ``compliance/kaldi.py`` (needed only where torchaudio does not import;
torchaudio 2.11.0 does not on torch 2.13 CPU). Inputs: the shared fixture's PNGs and WAV clips (``--fixture``).
Writes beside itself: ``ckpt/`` (the checkpoint), ``reference.npz`` and ``cases.json``, byte-identical over runs.
"""
import argparse
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types

import numpy as np
import soundfile
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torch.nn.utils.rnn import pad_sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
FIXTURE = os.path.join(os.environ.get("VITA_SHARED", os.path.join(os.path.dirname(REPO), "shared")), "fixtures",
                       "vita15-tiny")  # --fixture
SEED, SEED_VIT_FOLDER, SEED_WHALE_FOLDER = 20260524, 31, 32
VIT_DIR, WHALE_DIR = "InternViT-tiny-42px-p7", "audio-encoder-tiny-whale-v2"
# token ids (synthetic, no tokenizer): pad/bos, <|im_start|>, <|im_end|> (eos), the speech-answer state token
PAD_ID, IM_START, IM_END, STATE = 216, 217, 218, 219
NL, SYSTEM, USER, ASSISTANT = 10, 11, 12, 13
IMAGE, AUDIO, IGNORE = -200, -500, -100
LLM = dict(vocab_size=224, hidden_size=80, intermediate_size=144, num_hidden_layers=3, num_attention_heads=5,
           num_key_value_heads=1, rope_theta=10000.0, rms_norm_eps=1e-5)
VIT = dict(image_size=42, patch_size=7, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
           intermediate_size=96, layer_norm_eps=1e-5)
WHALE = dict(dim=40, heads=5, units=72, blocks=3, kernel=3, activation="relu")
# audio clips: (fixture wav, first sample, samples)
CLIPS = {"A": ("clip0.wav", 1600, 17600), "B": ("clip1.wav", 0, 9920), "C": ("clip0.wav", 12000, 13000)}
# images: (fixture png, tiles of the official dynamic_preprocess at 42 px, max 6)
IMAGES = {"img3": "img3_astronaut_120x64.png", "img2": "img2_chelsea_56x56.png", "img1": "img1_coffee_60x200.png"}


def _module(name):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() callers want one
    sys.modules[name] = m
    return m


def stand_ins(kaldi_path):
    """Import stand-ins that change no maths (as the shared fixture's generator used): torchvision's CUDA op
    registrations, the unused EVA tower's xformers, the unused video reader, and torchaudio (load + kaldi)."""
    _module("torchvision._meta_registrations")
    for name in ("xformers", "xformers.ops", "decord"):
        try:
            importlib.import_module(name)
        except ImportError:
            _module(name)
    sys.modules["decord"].VideoReader = sys.modules["decord"].cpu = None
    try:
        import torchaudio  # noqa: F401  (the real one where it imports)
        return
    except (ImportError, OSError):
        pass
    ta = _module("torchaudio")
    ta.load = lambda path: (torch.from_numpy(soundfile.read(path, dtype="float32", always_2d=True)[0].T.copy()),
                            soundfile.info(path).samplerate)
    comp = ta.compliance = _module("torchaudio.compliance")
    spec = importlib.util.spec_from_file_location("torchaudio.compliance.kaldi", kaldi_path)
    kaldi = importlib.util.module_from_spec(spec)
    sys.modules["torchaudio.compliance.kaldi"], comp.kaldi = kaldi, kaldi
    spec.loader.exec_module(kaldi)


def write_json(path, obj, indent=2):
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


# ------------------------------------------------------------------------------ random values
def fill(named, seed):
    """Random, non-trivial values for every float tensor of ``named`` (name -> tensor, in place), by role:
    norm weights U(0.6, 1.4), norm biases N(0, 0.1), other biases U(-0.2, 0.2), layer scales U(0.3, 1.3),
    whale pos_bias N(0, 0.5), embeddings N(0, 1), weights N(0, 1/fan_in); CMVN buffers are left alone."""
    g = torch.Generator().manual_seed(seed)
    for name, t in named.items():
        if "global_cmvn" in name or not t.is_floating_point():
            continue
        norm = any(s in name for s in ("norm", "bn2", "embed.1.")) and "linear" not in name
        if norm and name.endswith("weight"):
            v = torch.rand(t.shape, generator=g) * 0.8 + 0.6
        elif norm:
            v = torch.randn(t.shape, generator=g) * 0.1
        elif name.endswith("bias"):
            v = torch.rand(t.shape, generator=g) * 0.4 - 0.2
        elif name.endswith(("ls1", "ls2")):
            v = torch.rand(t.shape, generator=g) + 0.3
        elif "pos_bias" in name:
            v = torch.randn(t.shape, generator=g) * 0.5
        elif "embed_tokens" in name or name.endswith(("class_embedding", "position_embedding")):
            v = torch.randn(t.shape, generator=g)
        else:
            v = torch.randn(t.shape, generator=g) / np.sqrt(max(1, t[0].numel()))
        t.copy_(v.to(t.dtype))


def cmvn_stats(seed, bins=80, frames=123457):
    """Official ``global_cmvn`` statistics (mean about 15, istd about 0.3, different per bin)."""
    rng = np.random.default_rng(seed)
    mean, std = rng.uniform(11, 18, bins), rng.uniform(2.5, 4.5, bins)
    return {"mean_stat": list(mean * frames), "var_stat": list((std ** 2 + mean ** 2) * frames), "frame_num": frames}


# ------------------------------------------------------------------------------ the checkpoint
def vit_folder(ckpt):
    from vita.model.multimodal_encoder.internvit.modeling_intern_vit import (  # official code (--vita)
        InternVisionConfig,
        InternVisionModel,
    )
    d = os.path.join(ckpt, VIT_DIR)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(FIXTURE, "InternViT-tiny-56px", "config.json")) as f:
        cfg = dict(json.load(f), torch_dtype="bfloat16", **VIT)
    with open(os.path.join(FIXTURE, "InternViT-tiny-56px", "preprocessor_config.json")) as f:
        proc = dict(json.load(f), crop_size=VIT["image_size"], size=VIT["image_size"])
    write_json(os.path.join(d, "config.json"), cfg)
    write_json(os.path.join(d, "preprocessor_config.json"), proc)
    model = InternVisionModel(InternVisionConfig(**cfg))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fill(sd, SEED_VIT_FOLDER)  # "upstream" weights: other values than the shards (the shards must win)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})


def whale_yaml():
    """The shared fixture's ``train.yaml`` (full attention, dither 0) with this variant's dimensions."""
    with open(os.path.join(FIXTURE, "audio-encoder-tiny-whale", "train.yaml")) as f:
        y = yaml.safe_load(f)
    w, enc = WHALE, y["encoder_conf"]
    enc["overview_conf"]["encoder-output-dim"] = enc["para_conf"]["subsampling"]["subsampling-output-dim"] = w["dim"]
    enc["para_conf"]["transformer"].update({"transformer-input-dim": w["dim"], "transformer-output-dim": w["dim"],
                                            "transformer-attention-dim": w["dim"],
                                            "transformer-attention-heads": w["heads"],
                                            "transformer-linear-units": w["units"],
                                            "transformer-num-blocks": w["blocks"]})
    y["model_conf"].update(enc_out_dim=w["dim"], llm_embed_dim=LLM["hidden_size"], kernel_size=w["kernel"],
                           activation_func=w["activation"])
    return y


def whale_folder(ckpt):
    from vita.model.multimodal_encoder.whale.init_model import init_model  # official code (--vita)
    d = os.path.join(ckpt, WHALE_DIR)
    os.makedirs(d, exist_ok=True)
    y = whale_yaml()
    with open(os.path.join(d, "train.yaml"), "w") as f:
        yaml.safe_dump(y, f, sort_keys=False)
    write_json(os.path.join(d, "global_cmvn"), cmvn_stats(SEED), indent=None)
    y["cmvn_file"] = os.path.join(d, "global_cmvn")
    y["model_conf"].update(freeze_encoder=True, freeze_adpter=False, audio_prompt_finetune=False, audio_prompt_num=0)
    sd = {k: v.clone() for k, v in init_model(y).state_dict().items()}
    fill(sd, SEED_WHALE_FOLDER)  # "upstream" weights: other values than the shards (CMVN the same)
    torch.save({k: (v if "global_cmvn" in k else v.to(torch.bfloat16)) for k, v in sd.items()},
               os.path.join(d, "final.pt"))


def write_checkpoint(ckpt):
    """The release folder; the shards are what ``model.to(bfloat16).save_pretrained`` writes (the real
    release's dtype, CMVN buffers included), in 3 shards."""
    from vita.model.language_model.vita_qwen2 import VITAQwen2Config, VITAQwen2ForCausalLM  # official code (--vita)
    vit_folder(ckpt)
    whale_folder(ckpt)
    with open(os.path.join(FIXTURE, "config.json")) as f:
        hf = json.load(f)
    hf.update(LLM, _name_or_path="vita15-tiny-variant", bos_token_id=PAD_ID, eos_token_id=IM_END,
              max_window_layers=LLM["num_hidden_layers"], mm_hidden_size=4 * VIT["hidden_size"],
              mm_vision_tower=VIT_DIR, mm_audio_encoder=WHALE_DIR)
    cwd = os.getcwd()
    os.chdir(ckpt)  # the official loaders resolve the relative folder names against the working directory
    try:
        model = VITAQwen2ForCausalLM(VITAQwen2Config(**hf))
        sd = model.state_dict()
        fill(sd, SEED)
        model.to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="400KB", safe_serialization=True)
    finally:
        os.chdir(cwd)


def from_folder(folder):
    """``(model, loading info)``: the official model read from a release folder in float32 (SDPA)."""
    from vita.model.language_model.vita_qwen2 import VITAQwen2ForCausalLM  # official code (--vita)
    cwd = os.getcwd()
    os.chdir(folder)  # the official loaders resolve the relative folder names against the working directory
    try:
        model, info = VITAQwen2ForCausalLM.from_pretrained(".", torch_dtype=torch.float32, output_loading_info=True)
    finally:
        os.chdir(cwd)
    return model.eval(), info


def load(ckpt):
    """The variant read back, with no missing or unexpected keys."""
    model, info = from_folder(ckpt)
    assert not any(info.values()), info
    assert model.config._attn_implementation == "sdpa"
    return model


# ------------------------------------------------------------------------------ the batch
def rows():
    """Four examples in the official chat layout: ``(ids, labels, image names, clip names)`` each. Row 0: two
    images (3 tiles + 1 tile) and a clip, two assistant turns (two supervised spans); row 1: two clips, no image;
    row 2: text only, an ignored span inside the answer; row 3: one image of 4 tiles, no system turn."""
    rng = np.random.default_rng(SEED + 1)

    def t(n):
        return [int(x) for x in rng.integers(20, PAD_ID, n)]

    def turn(role, body, sup=None):  # sup: the supervised part of an assistant body (None: the whole body)
        pieces = [([IM_START, role, NL], False)]
        pieces += sup if sup is not None else [(body, role == ASSISTANT)]
        return pieces + [([IM_END], role == ASSISTANT), ([NL], False)]

    sys_turn = lambda n: turn(SYSTEM, t(n))  # noqa: E731
    spec = [
        (sys_turn(4) + turn(USER, [IMAGE] * 3 + [NL] + t(2) + [IMAGE] + t(2) + [AUDIO]) +
         turn(ASSISTANT, [STATE] + t(4)) + turn(USER, t(3)) + turn(ASSISTANT, t(3)), ["img3", "img2"], ["A"]),
        (sys_turn(3) + turn(USER, [AUDIO] + t(2) + [AUDIO]) + turn(ASSISTANT, [STATE] + t(3)), [], ["B", "C"]),
        (sys_turn(2) + turn(USER, t(6)) + turn(ASSISTANT, None, [(t(2), True), (t(2), False), (t(1), True)]), [], []),
        (turn(USER, [IMAGE] * 4 + t(3)) + turn(ASSISTANT, t(4)), ["img1"], []),
    ]
    out = []
    for pieces, images, clips in spec:
        pieces = pieces[:-1]  # no newline after the last <|im_end|>
        ids = [i for p, _ in pieces for i in p]
        labels = [i if sup else IGNORE for p, sup in pieces for i in p]
        out.append((np.array(ids, np.int64), np.array(labels, np.int64), images, clips))
    return out


def media(model):
    """Official tiles (``dynamic_preprocess`` at 42 px, max 6, thumbnail) -> ``process_images``, and official
    fbanks (``audio_processor.process`` on 16-bit WAV slices of the fixture's clips)."""
    from vita.util.data_utils_video_audio_neg_patch import dynamic_preprocess  # official code (--vita)
    tiles = {}
    for name, png in IMAGES.items():
        img = Image.open(os.path.join(FIXTURE, "reference", png)).convert("RGB")
        parts, _ = dynamic_preprocess(img, min_num=1, max_num=6, image_size=VIT["image_size"], use_thumbnail=True)
        tiles[name] = model.process_images(parts, model.config)
    clips = {}
    proc = model.get_audio_encoder().audio_processor
    with tempfile.TemporaryDirectory() as tmp:
        for name, (wav, start, n) in CLIPS.items():
            data, sr = soundfile.read(os.path.join(FIXTURE, "reference", wav), dtype="int16")
            path = os.path.join(tmp, name + ".wav")
            soundfile.write(path, data[start:start + n], sr, subtype="PCM_16")
            fbank, n_llm = proc.process(path)
            clips[name] = (fbank, n_llm)
    return tiles, clips


def official_inputs(examples, tiles, clips):
    """The official call's arguments: ids padded with PAD_ID, one image entry per tile plus a zero dummy tile for
    each row without ``<image>``, one audio entry per clip plus a dummy ``zeros(400, 80)`` (lengths 400 / 60) for
    each row without ``<audio>``, all in batch order, audio zero-padded like the training collator."""
    L = max(len(e[0]) for e in examples)
    ids = np.full((len(examples), L), PAD_ID, np.int64)
    labels = np.full((len(examples), L), IGNORE, np.int64)
    images, feats, lens, llm = [], [], [], []
    S = VIT["image_size"]
    for b, (i, lab, imgs, cl) in enumerate(examples):
        ids[b, :len(i)], labels[b, :len(lab)] = i, lab
        images += [tiles[n] for n in imgs] or [torch.zeros(1, 3, S, S)]
        for f, n in [clips[c] for c in cl] or [(torch.zeros(400, 80), 60)]:
            feats.append(f)
            lens.append(len(f))
            llm.append(n)
    audios = {"audios": pad_sequence(feats, batch_first=True, padding_value=0), "lengths": torch.tensor(lens),
              "lengths_for_llm": torch.tensor(llm)}
    ids = torch.from_numpy(ids)
    return dict(input_ids=ids, attention_mask=ids != PAD_ID, labels=torch.from_numpy(labels),
                images=torch.cat(images), audios=audios)


@torch.no_grad()
def run(model, inputs):
    """Spliced embeddings / labels / mask (``prepare_inputs_labels_for_multimodal``), logits and loss (the
    official forward)."""
    _, _, mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
        inputs["input_ids"], None, inputs["attention_mask"], None, inputs["labels"], inputs["images"],
        inputs["audios"], None)
    out = model(**inputs)
    return dict(spliced_inputs_embeds=embeds.numpy(), spliced_labels=labels.numpy(),
                spliced_attention_mask=mask.numpy(), spliced_lengths=mask.sum(1).numpy(),
                logits=out.logits.numpy(), loss=np.float32(out.loss.item()))


@torch.no_grad()
def check_fixture():
    """Set-up check: the shared fixture's forward.npz reproduced by this environment's official code."""
    model, _ = from_folder(FIXTURE)
    r = np.load(os.path.join(FIXTURE, "reference", "forward.npz"))
    a = {"audios": torch.from_numpy(r["audio_feats"]), "lengths": torch.from_numpy(r["audio_lengths"]),
         "lengths_for_llm": torch.from_numpy(r["audio_lengths_for_llm"])}
    out = model(input_ids=torch.from_numpy(r["input_ids"]), attention_mask=torch.from_numpy(r["attention_mask"]),
                labels=torch.from_numpy(r["labels"]), images=torch.from_numpy(r["images"]), audios=a)
    return {"loss_abs_diff": abs(out.loss.item() - float(r["loss"])),
            "logits_max_abs_diff": float(np.abs(out.logits.numpy() - r["logits"]).max())}


def per_example(model, examples, tiles, clips):
    """Each example alone (with its own dummies): the official loss and its target count."""
    loss, count = [], []
    for ex in examples:
        r = run(model, official_inputs([ex], tiles, clips))
        loss.append(r["loss"])
        count.append(int((r["spliced_labels"][0, 1:] != IGNORE).sum()))
    return np.array(loss, np.float32), np.array(count, np.int64)


def reference(model, examples, tiles, clips):
    """Everything the test reads: the inputs (real tiles and clips only: the test passes no dummies), the
    official outputs of the batch, and the per-example losses."""
    inputs = official_inputs(examples, tiles, clips)
    out = run(model, inputs)
    loss, count = per_example(model, examples, tiles, clips)
    fb, px = [clips[c][0] for e in examples for c in e[3]], [tiles[n] for e in examples for n in e[2]]
    return dict(input_ids=inputs["input_ids"].numpy(), attention_mask=inputs["attention_mask"].numpy(),
               labels=inputs["labels"].numpy(), pixel_values=torch.cat(px).numpy(),
               audio_feats=pad_sequence(fb, batch_first=True).numpy(),
               audio_lengths=np.array([len(f) for f in fb], np.int64),
               audio_lengths_for_llm=np.array([clips[c][1] for e in examples for c in e[3]], np.int64),
               example_loss=loss, example_count=count, **out)


def summary(ref, examples, tiles, clips, setup, rerun):
    mean = float((ref["example_loss"].astype(np.float64) * ref["example_count"]).sum() / ref["example_count"].sum())
    return {
        "set": "vita_variant: a second tiny VITA-1.5 for the official-code parity of the full model (issue #24)",
        "official_code": {"repo": "github.com/VITA-MLLM/VITA", "commit": "35d064a", "torch": torch.__version__,
                          "transformers": __import__("transformers").__version__},
        "seeds": {"shards": SEED, "vit_folder": SEED_VIT_FOLDER, "whale_folder": SEED_WHALE_FOLDER, "ids": SEED + 1},
        "dims": {"llm": LLM, "vit": VIT, "whale": WHALE, "tokens_per_tile": 9},  # (42 / 7 / 2) ** 2
        "special_ids": {"pad_bos": PAD_ID, "im_start": IM_START, "im_end": IM_END, "state": STATE, "nl": NL},
        "checkpoint": "shards = model.to(bfloat16).save_pretrained (CMVN buffers in bf16 too), folders hold other "
                      "random values (bf16; final.pt CMVN fp32); loaded by the official code in float32 (SDPA)",
        "batch": {"rows": [{"images": e[2], "tiles": [len(tiles[n]) for n in e[2]], "clips": e[3],
                            "ids": len(e[0]), "spliced": int(n)} for e, n in zip(examples, ref["spliced_lengths"])],
                  "clips": {c: {"wav": w, "start": s, "samples": n, "frames": len(clips[c][0]),
                                "llm_tokens": clips[c][1]} for c, (w, s, n) in CLIPS.items()},
                  "dummies": "official call: a zero tile for rows 1 and 2, a zeros(400, 80) clip (lengths 400 / 60) "
                             "for rows 2 and 3, in batch order (the audio batch is padded to 400 frames); "
                             "reference.npz holds the real tiles and clips only"},
        "loss": float(ref["loss"]), "example_loss": ref["example_loss"].tolist(),
        "example_count": ref["example_count"].tolist(), "count_weighted_mean_of_example_losses": mean,
        "batch_loss_minus_weighted_mean": float(ref["loss"]) - mean,
        "setup_check_shared_fixture_forward": setup, "rerun_fresh_load_max_abs_diff": rerun,
    }


def main():
    global FIXTURE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vita", required=True, help="official VITA checkout (the folder holding vita/)")
    ap.add_argument("--kaldi", help="torchaudio 2.11.0's compliance/kaldi.py (where torchaudio does not import)")
    ap.add_argument("--fixture", default=FIXTURE, help="the shared vita15-tiny fixture (inputs: PNGs, WAVs)")
    args = ap.parse_args()
    FIXTURE = os.path.abspath(args.fixture)
    sys.argv = sys.argv[:1]  # the whale encoder parses the process command line (parse_known_args)
    sys.path.insert(0, os.path.abspath(args.vita))
    stand_ins(args.kaldi)
    torch.manual_seed(0)
    print("set-up check (shared fixture forward.npz):", setup := check_fixture())
    ckpt = os.path.join(HERE, "ckpt")
    shutil.rmtree(ckpt, ignore_errors=True)
    os.makedirs(ckpt)
    write_checkpoint(ckpt)
    model = load(ckpt)
    tiles, clips = media(model)
    examples = rows()
    ref = reference(model, examples, tiles, clips)
    again = run(load(ckpt), official_inputs(examples, tiles, clips))
    rerun = {k: float(np.abs(again[k] - ref[k]).max()) for k in ("spliced_inputs_embeds", "logits", "loss")}
    np.savez_compressed(os.path.join(HERE, "reference.npz"), **ref)
    write_json(os.path.join(HERE, "cases.json"), summary(ref, examples, tiles, clips, setup, rerun), indent=1)
    print("loss", float(ref["loss"]), "per example", ref["example_loss"], ref["example_count"], "rerun", rerun)


if __name__ == "__main__":
    main()
