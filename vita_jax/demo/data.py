"""The demo's offline dataset: real photos from scikit-image, procedurally drawn scenes with
generated captions and question-answer pairs, and speech (espeak-ng when installed, else the CMU
ARCTIC recordings bundled with vita_jax), written in the official VITA JSON format.

Everything is made from a seed on the fly; the held-out splits use fresh random scenes, other crops
of the photos and noise-perturbed recordings (a few minutes of CPU training cannot generalise to
unseen photos or voices, so "held out" means unseen renderings of the same concepts).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers

from vita_jax import assets
from vita_jax.assets import A0009_WORDS
from vita_jax.data import audio as audio_lib
from vita_jax.data.text import IM_END, IM_START, STATE_NEGATIVE, STATE_SPEECH, STATE_TEXT, SYSTEM_PROMPTS

log = logging.getLogger(__name__)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
# scikit-image's bundled photos (files inside the wheel) and what the demo calls them
PHOTOS = {"astronaut.png": "astronaut", "chelsea.png": "cat", "coffee.png": "coffee", "rocket.jpg": "rocket",
          "motorcycle_left.png": "motorcycle", "hubble_deep_field.jpg": "galaxy", "coins.png": "coins",
          "camera.png": "cameraman"}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
             "count": "How many shapes are there?"}
CAPTION_PROMPT = "Describe the picture."
PHOTO_PROMPT = "What is in this photo?"
TRANSCRIBE_PROMPT = "Write down what was said."


def answer(kind: str, colour: str, shape: str, count: int) -> str:
    return {"colour": f"{colour}.", "shape": f"{shape}.", "count": f"{COUNTS[count]}."}[kind]


def sentence(kind: str, colour: str, shape: str, count: int) -> str:
    """The LoRA stage's answers: :func:`answer` as a whole sentence (a new style; the fact is the same)."""
    if kind == "count":
        return f"there {'is' if count == 1 else 'are'} {COUNTS[count]} shape{'s' if count > 1 else ''}."
    return {"colour": f"the colour is {colour}.", "shape": f"the shape is a {shape}."}[kind]


def caption(colour: str, shape: str, count: int) -> str:
    return f"{'a' if count == 1 else COUNTS[count]} {colour} {shape}{'s' if count > 1 else ''}."


# ---------------------------------------------------------------------------------- images
def draw_scene(colour: str, shape: str, count: int, rng: np.random.Generator, size: int = 112,
               big: bool = False) -> Image.Image:
    """``count`` shapes of one colour at random places and sizes on a noisy light background
    (``big``: one shape near the centre, a third of the picture wide)."""
    bg = rng.integers(200, 256, 3)
    arr = np.clip(bg[None, None] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    cells = rng.permutation(4)[:count]  # one shape per quadrant: no overlaps, easy to count
    for cell in cells:
        r = int(rng.integers(size // 8, size // 5))
        cx = (cell % 2) * size // 2 + size // 4 + int(rng.integers(-size // 16, size // 16 + 1))
        cy = (cell // 2) * size // 2 + size // 4 + int(rng.integers(-size // 16, size // 16 + 1))
        if big:
            r = int(rng.integers(size // 4, size // 3))
            cx, cy = (size // 2 + int(rng.integers(-size // 10, size // 10 + 1)) for _ in range(2))
        fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return im


def photo_paths() -> dict[str, str]:
    """``{name: path}`` of the photos shipped inside scikit-image."""
    try:
        import skimage  # heavy import (~1 s), only when the photos are made
    except ImportError as e:
        raise RuntimeError("the demo's photos come from scikit-image: pip install scikit-image") from e
    root = os.path.join(os.path.dirname(skimage.__file__), "data")
    out = {name: os.path.join(root, f) for f, name in PHOTOS.items() if os.path.exists(os.path.join(root, f))}
    if len(out) < 4:
        raise RuntimeError(f"{root}: too few of scikit-image's sample photos were found ({sorted(out)})")
    return out


def photo_view(path: str, rng: np.random.Generator, size: int = 112) -> Image.Image:
    """A random crop (70-100 % of the short side), maybe mirrored, with a little colour jitter."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = int(min(w, h) * rng.uniform(0.7, 1.0))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    im = im.crop((x, y, x + s, y + s)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, np.float32) * rng.uniform(0.85, 1.15) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------- speech
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str) -> np.ndarray:
    """``text`` -> float32 16 kHz waveform synthesised by espeak-ng."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "175", "-w", path, text], check=True, capture_output=True)
        wav, sr = audio_lib.load_audio(path)
    return audio_lib.prepare_waveform(wav, sr, path) / 32768.0


class Speech:
    """The demo's voice. ``questions[kind]`` and ``phrases`` are ``(text, waveform 16 kHz)``; with
    espeak-ng the questions are spoken as written, otherwise three real CMU ARCTIC phrases stand in
    for the three questions (the model learns which phrase asks what) and are also the phrases
    the speech stages transcribe. ``word(w)`` is a waveform for one reply word (speech decoder)."""

    def __init__(self, mode: str = "auto"):
        if mode == "auto":
            mode = "espeak" if espeak_available() else "recordings"
        if mode == "espeak" and not espeak_available():
            raise ValueError("--speech espeak: espeak-ng is not installed (--speech recordings: the bundled clips)")
        self.mode = mode
        clips = {n: (t, w) for n, w, t in assets.speech_clips()}
        stand_in = ("arctic_a0009_w0-3", "arctic_a0009_w3-6", "arctic_a0009_w6-9")
        if mode == "espeak":
            self.questions = {k: (q, espeak(q)) for k, q in QUESTIONS.items()}
            self.source = "espeak-ng (synthesised) + CMU ARCTIC recordings (bundled)"
        else:
            self.questions = {k: clips[n] for k, n in zip(QUESTIONS, stand_in)}
            self.source = ("CMU ARCTIC recordings bundled with vita_jax (espeak-ng not found): the phrases "
                           + ", ".join(f"'{clips[n][0]}' asks the {k}" for k, n in zip(QUESTIONS, stand_in)))
        # short phrases only (the full ARCTIC sentences are 3-4 s; the demo's audio bucket is 1.9 s)
        self.phrases = [self.questions[k] for k in QUESTIONS] + [clips[n] for n in clips
                                                                 if n not in stand_in and len(clips[n][1]) < 28000]
        self._words = {}
        wav9 = clips["arctic_a0009"][1]
        self._word_clips = [wav9[int(s * 16000):int(e * 16000)] for s, e, _ in A0009_WORDS]

    def word(self, w: str) -> np.ndarray:
        """One word's waveform: espeak-ng, or (recordings mode) a recorded ARCTIC word picked by the
        word's hash: a stand-in voice whose sound does not match the text."""
        if w not in self._words:
            if self.mode == "espeak":
                self._words[w] = espeak(w)
            else:
                k = sum(map(ord, w)) % len(self._word_clips)
                self._words[w] = self._word_clips[k]
        return self._words[w]


def perturb(wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A held-out rendering: random gain and white noise at ~25 dB SNR."""
    rms = float(np.sqrt(np.mean(wav ** 2))) + 1e-6
    return (wav * rng.uniform(0.7, 1.3) + rng.normal(0, rms / 18, wav.shape)).astype(np.float32)


# ----------------------------------------------------------------------------------- files
def _conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


class DemoData:
    """Writes every split the demo trains and evaluates on under ``root`` (official JSON format,
    media files beside it) and keeps the texts needed for the tokenizer and the speech decoder."""

    def __init__(self, root: str, speech: Speech, seed: int = 0, n_train: int = 96, n_eval: int = 24):
        self.root, self.speech, self.rng = root, speech, np.random.default_rng(seed)
        self.n_train, self.n_eval = n_train, n_eval
        os.makedirs(os.path.join(root, "media"), exist_ok=True)
        self._k = 0
        self.photos = photo_paths()

    def _save_image(self, im: Image.Image) -> str:
        self._k += 1
        name = f"media/img{self._k:05d}.png"
        im.save(os.path.join(self.root, name))
        return name

    def _save_wav(self, wav: np.ndarray) -> str:
        self._k += 1
        name = f"media/wav{self._k:05d}.wav"
        sf.write(os.path.join(self.root, name), np.asarray(wav, np.float32), 16000, subtype="FLOAT")
        return name

    def _write(self, name: str, samples: list[dict]) -> str:
        path = os.path.join(self.root, name + ".json")
        with open(path, "w") as f:
            json.dump(samples, f, indent=0)
        return path

    def _scene(self, count=None, big=False):
        colour = str(self.rng.choice(list(COLOURS)))
        shape = str(self.rng.choice(SHAPES))
        count = int(count or self.rng.integers(1, 4))
        return colour, shape, count, self._save_image(draw_scene(colour, shape, count, self.rng, big=big))

    def captions(self, split: str, n: int) -> str:
        out = []
        for i in range(n):
            colour, shape, count, img = self._scene(count=1, big=True)
            out.append({"id": f"caption-{split}-{i}", "image": img,
                        "conversations": _conv(f"<image>\n{CAPTION_PROMPT}", caption(colour, shape, 1))})
        return self._write(f"captions_{split}", out)

    def photos_split(self, split: str, n: int) -> str:
        names = sorted(self.photos)
        out = []
        for i in range(n):
            name = names[i % len(names)]
            img = self._save_image(photo_view(self.photos[name], self.rng))
            out.append({"id": f"photo-{split}-{i}", "image": img,
                        "conversations": _conv(f"<image>\n{PHOTO_PROMPT}", f"{name}.")})
        return self._write(f"photos_{split}", out)

    def vqa(self, split: str, n: int, sentences: bool = False) -> str:
        """Questions about new scenes (colour, shape, count in turn); ``sentences``: answered in whole sentences
        (:func:`sentence`, the LoRA stage's data) instead of one word."""
        name, reply = ("sentences", sentence) if sentences else ("vqa", answer)
        out = []
        for i in range(n):
            colour, shape, count, img = self._scene()
            kind = list(QUESTIONS)[i % len(QUESTIONS)]
            out.append({"id": f"{name}-{split}-{i}", "image": img,
                        "conversations": _conv(f"<image>\n{QUESTIONS[kind]}", reply(kind, colour, shape, count))})
        return self._write(f"{name}_{split}", out)

    def transcripts(self, split: str, n: int) -> str:
        out = []
        for i in range(n):
            text, wav = self.speech.phrases[i % len(self.speech.phrases)]
            if split != "train" or i >= len(self.speech.phrases):
                wav = perturb(wav, self.rng)
            out.append({"id": f"asr-{split}-{i}", "audio": [self._save_wav(wav)],
                        "conversations": _conv(f"<audio>\n{TRANSCRIBE_PROMPT}", normalise(text) + ".")})
        return self._write(f"asr_{split}", out)

    def spoken_vqa(self, split: str, n: int) -> str:
        out = []
        for i in range(n):
            colour, shape, count, img = self._scene()
            kind = list(QUESTIONS)[i % len(QUESTIONS)]
            wav = self.speech.questions[kind][1]
            if split != "train" or i >= len(QUESTIONS):
                wav = perturb(wav, self.rng)
            out.append({"id": f"svqa-{split}-{i}", "image": img, "audio": [self._save_wav(wav)],
                        "conversations": _conv("<image>\n<audio>", answer(kind, colour, shape, count))})
        return self._write(f"spoken_vqa_{split}", out)

    def text_qa(self, split: str, n: int) -> str:
        """Text-only stand-in for the pretrained LLM's knowledge: the replies' language, no media."""
        out = []
        names = sorted(self.photos)
        for i in range(n):
            colour, shape = str(self.rng.choice(list(COLOURS))), str(self.rng.choice(SHAPES))
            count = int(self.rng.integers(1, 4))
            desc = caption(colour, shape, count)
            kind = i % 6
            if kind < 3:
                q, a = QUESTIONS[list(QUESTIONS)[kind]], answer(list(QUESTIONS)[kind], colour, shape, count)
            elif kind == 3:
                q, a = CAPTION_PROMPT, desc
            elif kind == 4:
                desc = names[i % len(names)]
                q, a = PHOTO_PROMPT, f"{desc}."
            else:
                desc = normalise(self.speech.phrases[i % len(self.speech.phrases)][0])
                q, a = TRANSCRIBE_PROMPT, f"{desc}."
            # the description sits where the image / speech will, its words scattered over 16 slots
            # of filler as the image's 16 tokens are: the LLM learns to find the words by content,
            # not by position, which is what it needs to read them from projected media later
            out.append({"id": f"text-{split}-{i}", "conversations": _conv(f"{scatter(desc, self.rng)}\n{q}", a)})
        return self._write(f"text_{split}", out)

    def transcripts_text(self, split: str, n: int) -> str:
        """Stage 0's transcript task alone (a phrase's words scattered among fillers, written out): the text
        the stages that train the LLM replay so that it keeps the skill 2.1b's adapter relies on."""
        out = []
        for i in range(n):
            desc = normalise(self.speech.phrases[i % len(self.speech.phrases)][0])
            out.append({"id": f"transcript-text-{split}-{i}",
                        "conversations": _conv(f"{scatter(desc, self.rng)}\n{TRANSCRIBE_PROMPT}", f"{desc}.")})
        return self._write(f"transcripts_text_{split}", out)

    def asr_clips(self, split: str, n: int) -> list[tuple[np.ndarray, str]]:
        """``(waveform, transcript)`` for the CTC stage: the phrases, perturbed for held-out."""
        out = []
        for i in range(n):
            text, wav = self.speech.phrases[i % len(self.speech.phrases)]
            out.append((perturb(wav, self.rng) if split != "train" or i >= len(self.speech.phrases) else wav,
                        normalise(text)))
        return out


def scatter(text: str, rng: np.random.Generator, slots: int = 16) -> str:
    """The words of ``text`` in order at random slots among ``slots`` fillers (``_``)."""
    words = normalise(text).split()
    at = sorted(rng.choice(slots, size=min(len(words), slots), replace=False))
    out = ["_"] * slots
    for k, w in zip(at, words):
        out[k] = w
    return " ".join(out)


def normalise(text: str) -> str:
    """Lower case, letters and spaces only (transcripts, the CTC units)."""
    return " ".join("".join(ch if ch.isalpha() else " " for ch in text.lower()).split())


def reply_texts() -> list[str]:
    """Every reply the model is taught (captions, answers, photo names): the speech decoder's text."""
    out = [caption(c, s, 1) for c in COLOURS for s in SHAPES]
    out += [f"{c}." for c in COLOURS] + [f"{s}." for s in SHAPES] + [f"{w}." for w in COUNTS.values()]
    out += [f"{p}." for p in PHOTOS.values()]
    return out


def build_tokenizer(texts, path: str):
    """A word-level tokenizer over every word the demo uses (system prompts included) with the
    Qwen2 chat specials, saved as ``path/tokenizer.json``: it plays the Qwen2.5 tokenizer's part
    with a vocabulary of a few hundred, so a tiny model learns in minutes."""
    pre = pre_tokenizers.Whitespace()
    words = set()
    for t in list(texts) + list(SYSTEM_PROMPTS.values()) + ["user assistant system",
                                                             f"{STATE_SPEECH} {STATE_TEXT} {STATE_NEGATIVE}"]:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    specials = ["<|endoftext|>", IM_START, IM_END, "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


def codec_wavs(folder: str, seed: int = 0, piece_s: float = 0.5) -> tuple[str, str]:
    """Stage 3.1's speech: the two bundled ARCTIC recordings at 24 kHz (``scipy``'s polyphase 3/2
    resampling) cut into ``piece_s`` pieces with a −80 dBFS dither (16 kHz recordings have nothing
    above 8 kHz; the fixture README explains why training wants the dither); the last two pieces of
    a0009 are held out. Returns ``(train folder, held-out folder)`` of 32-bit float wavs."""
    from scipy.signal import resample_poly  # scipy comes with librosa; only this stage resamples by 3/2
    rng = np.random.RandomState(seed)
    n = int(piece_s * 24000)
    pieces = []
    for name, wav, _ in assets.speech_clips()[:2]:  # the two full recordings
        x = resample_poly(np.asarray(wav, np.float64), 3, 2)
        pieces += [(name, i, x[i * n:(i + 1) * n]) for i in range(len(x) // n)]
    out = {}
    for split, items in (("train", pieces[:-2]), ("heldout", pieces[-2:])):
        d = os.path.join(folder, split)
        os.makedirs(d, exist_ok=True)
        for name, i, x in items:
            x = x + 1e-4 * rng.standard_normal(len(x))
            sf.write(os.path.join(d, f"{name}_{i:02d}.wav"), x.astype(np.float32), 24000, subtype="FLOAT")
        out[split] = d
    return out["train"], out["heldout"]
