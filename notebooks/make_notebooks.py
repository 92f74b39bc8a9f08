"""Writes quickstart.ipynb, finetune.ipynb and finetune_lora.ipynb from the cells below (edit here, then run
``python notebooks/make_notebooks.py``; the .ipynb files are committed without outputs)."""
import os

import nbformat as nbf

HERE = os.path.dirname(os.path.abspath(__file__))

FIND = '''import os, sys, pathlib

def find_fixtures():
    """../shared/fixtures next to the checkout (CI, developers), or None."""
    for d in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:
        p = d / "shared" / "fixtures"
        if (p / "vita15-tiny").is_dir():
            return p
    return None

WORKDIR = pathlib.Path(os.environ.get("VITA_NB_WORKDIR", "vita_notebook_work")).absolute()
WORKDIR.mkdir(parents=True, exist_ok=True)
FIXTURES = find_fixtures()
print("work dir:", WORKDIR, "| fixtures:", FIXTURES)'''

INSTALL = ('# On Colab (TPU, GPU or CPU runtime) install vita_jax first; '
           'elsewhere `pip install -e ".[torch]"` in the checkout.\n'
           '''import os, sys, subprocess
if "google.colab" in sys.modules:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",'''
           ''' os.environ.get("VITA_JAX_PIP", "vita_jax[torch]")], check=True)
import jax
print("jax", jax.__version__, "devices:", jax.devices())''')

QUICK = [
    ("md", "# vita_jax quick start\n\nConvert a VITA-1.5 release directory to vita_jax, chat with text, an image "
           "and speech, and speak the answer.\n\nSet `RELEASE` to the folder of `VITA-MLLM/VITA-1.5` you "
           "downloaded (with `vita_tts_ckpt/` inside for speech). Without it the notebook builds a tiny "
           "random model in the official layout from `../shared/fixtures` (real Qwen2.5 tokenizer, the "
           "fixtures' speech decoder and codec): the replies are noise, every step is the real one."),
    ("code", INSTALL),
    ("code", FIND),
    ("code", '''RELEASE = os.environ.get("VITA_RELEASE", "")  # e.g. "/content/VITA-1.5"

if not RELEASE:
    import shutil
    import vita_jax
    from vita_jax import config as config_lib
    assert FIXTURES is not None, "set RELEASE: no ../shared/fixtures here"
    c = config_lib.load_config("tiny")
    c.llm.vocab_size = 152064                      # the real tokenizer's rows
    c.bos_token_id, c.eos_token_id = 151643, 151645
    RELEASE = str(WORKDIR / "vita-tiny-release")
    vita_jax.init_model(c, seed=0).save_pretrained(RELEASE, overwrite=True)   # official PyTorch layout
    tok = FIXTURES / "qwen2.5-tokenizer"
    for f in tok.iterdir():
        if f.suffix in (".json", ".txt") and "cases" not in f.name and "report" not in f.name:
            shutil.copy2(f, RELEASE)
    for part in ("decoder", "codec"):
        shutil.copytree(FIXTURES / "vita15-tiny" / "vita_tts_ckpt" / part,'''
             ''' pathlib.Path(RELEASE) / "vita_tts_ckpt" / part,
                        dirs_exist_ok=True)
print(sorted(os.listdir(RELEASE)))'''),
    ("md", "## Convert\n\nRead the official safetensors shards tensor by tensor and write a vita_jax (orbax) "
           "checkpoint; the CLI does the same: `vita-jax convert --to orbax RELEASE OUT`."),
    ("code", '''import time
import vita_jax

t = time.perf_counter()
model = vita_jax.from_pretrained(RELEASE)
print(f"read the release in {time.perf_counter() - t:.1f} s")
ORBAX = str(WORKDIR / "vita-orbax")
model.save_pretrained(ORBAX, format="orbax", overwrite=True)
model = vita_jax.from_pretrained(ORBAX)
print("parameters:", sum(x.size for x in jax.tree.leaves(model.params)))'''),
    ("md", "## Chat: text, image, speech"),
    ("code", '''print(model.chat("Hello! Who are you?", max_new_tokens=16))'''),
    ("code", '''from PIL import Image
import numpy as np
from vita_jax import assets

image = Image.fromarray(np.tile(np.linspace(0, 255, 224, dtype=np.uint8)[:, None, None], (1, 224, 3)))
print(model.chat("Describe this image.", image=image, max_new_tokens=16))
question = os.path.join(assets.SPEECH, "arctic_a0009.wav")   # a real recording (CMU ARCTIC)
print(model.chat("", image=image, audio=question, max_new_tokens=16))'''),
    ("md", "## Speak the answer"),
    ("code", '''import soundfile as sf

reply = model.chat("Say something.", max_new_tokens=12) or "hello"
wav = model.speak(reply, max_tokens=120)
sf.write(WORKDIR / "answer.wav", wav, model.speech.sample_rate)
print(f"{reply!r} -> {len(wav) / model.speech.sample_rate:.2f} s of audio in {WORKDIR / 'answer.wav'}")
try:
    from IPython.display import Audio, display
    display(Audio(wav, rate=model.speech.sample_rate))
except ImportError:
    pass'''),
]

FINETUNE = [
    ("md", "# Fine-tune one stage\n\nStage 1.3 (vision SFT: ViT + projector + LLM) of the curriculum on a small "
           "dataset in the official VITA JSON format, with the real trainer (jitted sharded step, optax "
           "masks, orbax checkpoints, grain pipeline), then the loss curve.\n\nWith `INIT_FROM` set (a "
           "release directory or a previous stage's `WORKDIR/model`) the stage starts from it; otherwise it "
           "trains the tiny model from scratch on the dataset made here (scikit-image photos and drawn "
           "shapes, a word-level tokenizer) so it runs anywhere in a minute or two."),
    ("code", INSTALL),
    ("code", FIND),
    ("code", '''STEPS = int(os.environ.get("VITA_NB_STEPS", "60"))
INIT_FROM = os.environ.get("VITA_INIT_FROM", "")

from vita_jax.demo import data as demo_data

speech = demo_data.Speech("recordings")
d = demo_data.DemoData(str(WORKDIR / "data"), speech, seed=0)
train_json, eval_json = d.vqa("train", 96), d.vqa("eval", 16)
texts = [m["value"].replace("<image>", " ") for path in (train_json, eval_json)
         for s in __import__("json").load(open(path)) for m in s["conversations"]]
demo_data.build_tokenizer(texts + demo_data.reply_texts(), str(WORKDIR / "tokenizer"))
print(open(train_json).read()[:400])'''),
    ("code", '''from vita_jax.train import stages, trainer

config = stages.stage_config("1.3", "tiny")
config.llm.vocab_size = 128
config.vision.image_size = config.image.size = config.image.crop_size = 112
config.image.max_dynamic_patch = 1
config.data.update(mixture=[dict(json=train_json, weight=1.0)], tokenizer=str(WORKDIR / "tokenizer"),
                   seq_len=192, max_tiles_per_sample=1, max_frames=192)
config.update(total_steps=STEPS, checkpoint_every=STEPS, batch_size=8, init_from=INIT_FROM)
config.optim.lr = 3e-3
out = trainer.train(config, str(WORKDIR / "stage1_3"), progress=True)
print("final loss", out["last"]["loss"])'''),
    ("code", '''import json
import matplotlib
matplotlib.use("Agg") if "ipykernel" not in sys.modules else None
import matplotlib.pyplot as plt

rows = [json.loads(l) for l in open(WORKDIR / "stage1_3" / "metrics.jsonl")]
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows]); ax[0].set_xlabel("step"); ax[0].set_ylabel("loss")
ax[1].plot([r["step"] for r in rows], [r["accuracy"] for r in rows]); ax[1].set_xlabel("step");'''
             ''' ax[1].set_ylabel("token accuracy")
fig.tight_layout(); fig.savefig(WORKDIR / "loss.png")
print(f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
assert rows[-1]["loss"] < rows[0]["loss"]'''),
    ("md", "The stage's parameters are in `WORKDIR/stage1_3/model` (use it as the next stage's `init_from`); "
           "`vita-jax convert --to pytorch WORKDIR/stage1_3/model OUT` writes the official layout."),
]

LORA = [
    ("md", "# LoRA / QLoRA fine-tuning\n\nAdapters of rank `RANK` on the LLM's attention and MLP projections "
           "(qwix), trained on stage 2.2 (audio SFT) while the base model stays frozen: no optimizer state and no "
           "weight gradients for it, run checkpoints that hold the adapters only, and an export merged into the "
           "official layout. With `BASE_DTYPE = \"int8\"` the frozen kernels are stored int8 (QLoRA).\n\n"
           "Here it runs at tiny size on CPU from the fixture release in a minute. **On a Colab TPU** (v5e): set "
           "`VITA_INIT_FROM` to a VITA-1.5 release folder, point `config.data.mixture` at your VITA-format JSON, use "
           "the full-size config (`stages.stage_config(\"2.2\")`), `RANK = 16`, `BASE_DTYPE = \"int8\"` and "
           "`config.remat_policy = \"full\"`, and check that it fits first: `vita-jax compile --config=stage2_2 "
           "--config.lora.rank=16 --config.lora.base_dtype=int8 --topology=v5e:2x2 --per-chip-batch=1 "
           "--config.data.seq_len=2048 --config.remat_policy=full` (5.15 GiB per chip, docs/scaling.md)."),
    ("code", INSTALL),
    ("code", FIND),
    ("code", '''STEPS = int(os.environ.get("VITA_NB_STEPS", "30"))
BASE = os.environ.get("VITA_INIT_FROM", "") or str(FIXTURES / "vita15-tiny")
RANK, BASE_DTYPE = 4, os.environ.get("VITA_LORA_BASE_DTYPE", "")  # "int8" / "int4": QLoRA

from vita_jax.train import stages, trainer

config = stages.stage_config("2.2", "tiny")   # full size: stages.stage_config("2.2") and your data
config.update(init_from=BASE, total_steps=STEPS, checkpoint_every=STEPS)
config.optim.lr, config.optim.warmup_ratio = 5e-3, 0.0
config.lora.update(rank=RANK, alpha=2.0 * RANK, base_dtype=BASE_DTYPE)
out = trainer.train(config, str(WORKDIR / "lora"), progress=True)
print("trainable:", sorted(out["state"].train)[:3], "...")'''),
    ("code", '''import json
import matplotlib
matplotlib.use("Agg") if "ipykernel" not in sys.modules else None
import matplotlib.pyplot as plt

rows = [json.loads(l) for l in open(WORKDIR / "lora" / "metrics.jsonl") if "loss" in l]
plt.figure(figsize=(5, 3.5)); plt.plot([r["step"] for r in rows], [r["loss"] for r in rows])
plt.xlabel("step"); plt.ylabel("loss"); plt.title(f"LoRA rank {RANK}"); plt.tight_layout()
plt.savefig(WORKDIR / "lora_loss.png")
print(f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
assert rows[-1]["loss"] < rows[0]["loss"]'''),
    ("code", '''import vita_jax

model = vita_jax.from_pretrained(str(WORKDIR / "lora" / "model"))   # the adapters merged into the base
print("merged model:", model.config.llm.num_hidden_layers, "layers; the official layout:",
      sorted(os.listdir(WORKDIR / "lora" / "model"))[:4])'''),
    ("md", "`config.lora.merge = False` exports the adapters alone (a few MB, naming their base); "
           "`vita_jax.from_pretrained(BASE, adapters=FOLDER)` merges them at load, and `vita-jax convert --to "
           "pytorch` writes the merged official layout. See docs/training.md (LoRA)."),
]


def build(cells, path):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nbf.write(nb, path)


if __name__ == "__main__":
    build(QUICK, os.path.join(HERE, "quickstart.ipynb"))
    build(FINETUNE, os.path.join(HERE, "finetune.ipynb"))
    build(LORA, os.path.join(HERE, "finetune_lora.ipynb"))
