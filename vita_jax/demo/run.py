"""``vita-jax demo``: the whole VITA-1.5 curriculum, small, on a laptop CPU, offline.

A word-level tokenizer and a tiny model (the shape of the tiny config) are trained stage by stage
with the real trainer (sharded step, optax masks, orbax checkpoints, official JSON data through the
grain pipeline): a text warm-up that stands in for the pretrained Qwen2.5, then 1.1 -> 1.2 -> 1.3
-> 2.1a -> 2.1b -> 2.2 (-> a LoRA fine-tune of its model, a side branch) -> 3.1 (the speech codec, on the
bundled recordings) -> 3.2. Each stage is measured on held-out examples before and after (3.1: the mel L1 of
held-out speech). The final model is exported to the official PyTorch layout, read back, and answers a spoken question
about an image in text and in a wav file. ``WORKDIR/summary.json`` holds the table.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import jax
import librosa
import numpy as np
import soundfile as sf

from vita_jax import api
from vita_jax.data import audio as audio_lib
from vita_jax.data import pipeline, stage_batches
from vita_jax.data import text as text_lib
from vita_jax.data.text import TextTokenizer
from vita_jax.data.units import UnitVocab
from vita_jax.demo import codec as codec_lib
from vita_jax.demo import data as demo_data
from vita_jax.demo import evaluate
from vita_jax.demo.evaluate import format_summary
from vita_jax.demo.plan import BATCH, LORA, MAX_FRAMES, PLAN, base_stage, steps
from vita_jax.infer import speech as speech_lib
from vita_jax.infer.speech import SpeechModel
from vita_jax.models.tts_decoder import TTSDecoderConfig
from vita_jax.sizes import round_up
from vita_jax.train import program, stages, trainer


class Demo:
    def __init__(self, workdir: str, budget_minutes: float = 15.0, speech: str = "auto", seed: int = 0,
                 codec: str | None = None, log=print, progress: bool = True):
        if not budget_minutes > 0:  # (before anything is written)
            raise ValueError(f"--budget-minutes {budget_minutes}: must be more than 0")
        self.wd, self.budget, self.seed, self.log, self.progress = (os.path.abspath(workdir), budget_minutes, seed,
                                                                      log, progress)
        self.speech = demo_data.Speech(speech)
        self.codec_dir = codec
        if codec is not None and codec != "trained":  # a folder given: read (small) before any stage runs
            self._codec = codec_lib.load_option(codec)
            self.codec_source = f"TiCodec from {codec}"
        os.makedirs(self.wd, exist_ok=True)
        self.results: list[dict] = []

    # ------------------------------------------------------------------ set-up
    def prepare(self):
        t = time.perf_counter()
        d = demo_data.DemoData(os.path.join(self.wd, "data"), self.speech, seed=self.seed)
        self.files = {
            "text": (d.text_qa("train", 240), d.text_qa("eval", 24)),
            "captions": (d.captions("train", 96), d.captions("eval", 48)),
            "photos": (d.photos_split("train", 96), d.photos_split("eval", 24)),
            "vqa": (d.vqa("train", 144), d.vqa("eval", 24)),
            "asr": (d.transcripts("train", 48), d.transcripts("eval", 24)),
            "svqa": (d.spoken_vqa("train", 144), d.spoken_vqa("eval", 24)),
        }
        self.ctc_clips = (d.asr_clips("train", 48), d.asr_clips("eval", 16))
        self.files["replay"] = (d.transcripts_text("train", 48), d.transcripts_text("eval", 8))
        # drawn last: the earlier stages' data stays what it was before the LoRA stage existed (same draws)
        self.files["sentences"] = (d.vqa("train", 96, sentences=True), d.vqa("eval", 24, sentences=True))
        texts = []
        for train, held in self.files.values():
            for path in (train, held):
                for s in json.load(open(path)):
                    texts += [m["value"].replace("<image>", " ").replace("<audio>", " ") for m in s["conversations"]]
        self.tok_dir = os.path.join(self.wd, "tokenizer")
        demo_data.build_tokenizer(texts + demo_data.reply_texts(), self.tok_dir)
        self.tok = TextTokenizer.from_file(self.tok_dir)
        self.photos = sorted(d.photos)
        self.seq_len = self._seq_len()
        self.log(f"data: {sum(len(json.load(open(p))) for pair in self.files.values() for p in pair)} samples in the "
                 f"official JSON format under {d.root} ({len(self.photos)} scikit-image photos: "
                 f"{', '.join(self.photos)}; procedurally drawn scenes)\nspeech: {self.speech.source}\n"
                 f"tokenizer: word level, {len(self.tok)} entries; sequence length {self.seq_len} "
                 f"({time.perf_counter() - t:.1f} s)")

    def _seq_len(self) -> int:
        """The longest spliced sample (text ids + 16 tokens per tile + the audio bucket's LLM
        length), rounded up to 16: one static sequence length for every stage."""
        tpt, aud = (112 // 14 // 2) ** 2, int(audio_lib.llm_length(MAX_FRAMES))
        longest = 0
        for train, held in self.files.values():
            for path in (train, held):
                for smp in json.load(open(path)):
                    modality = "image" if "image" in smp else "lang"
                    ids, _ = text_lib.encode_sample(smp, self.tok, modality, [1] if "image" in smp else [])
                    n_img = int((ids == text_lib.IMAGE_TOKEN_INDEX).sum())
                    n_aud = int((ids == text_lib.AUDIO_TOKEN_INDEX).sum())
                    longest = max(longest, len(ids) + n_img * (tpt - 1) + n_aud * (aud - 1))
        return round_up(longest, 16)

    def config(self, stage: str, init_from: str = ""):
        c = stages.stage_config(base_stage(stage), "tiny")
        if stage == "0":
            c.stage, c.description, c.trainable, c.optim.group_lrs = "0", PLAN["0"][0], ["llm/.*"], []
        if stage == "lora":  # the adapters are the whole trainable partition (config.trainable is not read)
            c.stage, c.description = "lora", PLAN["lora"][0]
            c.lora.update(LORA)
        c.llm.vocab_size = round_up(len(self.tok), 64)
        # a 128-wide LLM: a fresh projector / adapter steers it far more readily than the 64-wide one
        c.llm.update(hidden_size=128, intermediate_size=256)
        c.batch_size = BATCH
        c.total_steps = steps(stage, self.budget)
        c.checkpoint_every = c.total_steps  # one checkpoint per stage, at its end
        c.keep_checkpoints = 1
        c.seed = self.seed
        c.optim.lr = PLAN[stage][4]
        c.optim.warmup_ratio = 0.05
        if stage in ("1.2", "1.3"):
            c.optim.group_lrs = [["vision_tower/.*", PLAN[stage][4] / 3]]
        tiles, clips = PLAN[stage][5]
        c.data.update(seq_len=self.seq_len, max_frames=MAX_FRAMES, max_tiles_per_sample=tiles,
                      max_clips_per_sample=clips, tokenizer=self.tok_dir, shuffle_seed=self.seed)
        # 112 px tiles: 16 image tokens each (the tiny config's 56 px give only 4 to learn from)
        c.vision.image_size = c.image.size = c.image.crop_size = 112
        c.image.max_dynamic_patch = 1
        c.init_from = init_from
        if stage == "3.2":  # decoder input = LLM embedding rows split in 4, output = the codec's ids
            c.tts.update(idim=c.llm.hidden_size // 4, odim=int(self.codec()[0].n_codes))
        return c

    # ------------------------------------------------------------------ held-out data
    def lm_batches(self, config, path: str) -> list[dict]:
        """The held-out file as the trainer's own batches (same preprocessing and collator)."""
        return pipeline.held_out_batches(config, self.tok, path, BATCH)

    def codec(self):
        """``(config, raw, params)``: the codec trained in stage 3.1 (``--codec trained``), a folder given
        (``--codec DIR``), the tiny official-layout codec of ../shared/fixtures when found, else a
        randomly initialised one of the same shape."""
        if getattr(self, "_codec", None) is None:
            if self.codec_dir == "trained":
                path = os.path.join(self.wd, "3.1", "model", "vita_tts_ckpt", "codec")
                self._codec = speech_lib.load_codec(path)
                self.codec_source = f"TiCodec trained in stage 3.1 ({path})"
                return self._codec
            path = self.codec_dir or codec_lib.default_codec()
            if path:
                self._codec = speech_lib.load_codec(path)
                self.codec_source = f"TiCodec from {path}"
            else:
                self._codec = codec_lib.random_codec(self.seed)
                self.codec_source = "TiCodec with random weights (no --codec folder found)"
        return self._codec

    # ------------------------------------------------------------------ stages
    def run_stage(self, stage: str, init_from: str, train_json, eval_json):
        c = self.config(stage, init_from)
        c.data.mixture = [dict(json=p, weight=w) for p, w in train_json]
        batches = self.lm_batches(c, eval_json)
        before = evaluate.reply_accuracy(c, program.initial_params(c), batches)
        out = trainer.train(c, os.path.join(self.wd, stage), log=self._stage_log, progress=self.progress)
        after = evaluate.reply_accuracy(c, program.model_params_of(c, out["state"]), batches)  # LoRA: merged
        k = 2 if "NLL" in PLAN[stage][1] else 1 if "token" in PLAN[stage][1] else 0
        return self._record(stage, before[k], after[k], out, exact=(before[0], after[0]), token=(before[1], after[1]),
                            nll=(before[2], after[2]))

    def run_ctc(self, init_from: str):
        train, held = self.ctc_clips
        vocab = UnitVocab.train([t for _, t in train])
        # global CMVN statistics of the speech, as the official recipe computes before training
        feats = np.concatenate([audio_lib.audio_features(w, 16000) for w, _ in train])
        m = api.from_pretrained(init_from)
        enc = m.params["audio_encoder"]["encoder"]
        enc["cmvn_mean"] = np.asarray(feats.mean(0), np.float32)
        enc["cmvn_istd"] = np.asarray(1.0 / np.maximum(feats.std(0), 1e-5), np.float32)
        init = os.path.join(self.wd, "2.1a-init")
        m.save_pretrained(init, format="orbax", overwrite=True)
        c = self.config("2.1a", init)
        c.ctc_units = vocab.num_units
        width = max(len(vocab.encode(t)) for _, t in train + held)

        def batch(clips):
            return stage_batches.ctc_batch([w for w, _ in clips], [t for _, t in clips], vocab, frame_bucket=MAX_FRAMES,
                                       label_width=width)

        def make(i):
            order = np.random.default_rng((self.seed, i)).permutation(len(train))[:BATCH]
            return batch([train[k] for k in order])
        held_batch = batch(held)
        before = evaluate.ctc_cer(c, program.initial_params(c), held_batch, vocab)
        out = trainer.train(c, os.path.join(self.wd, "2.1a"), data=pipeline.IndexedBatches(make), log=self._stage_log,
                            progress=self.progress)
        after = evaluate.ctc_cer(c, stages.merge(out["state"].train, out["state"].frozen), held_batch, vocab)
        return self._record("2.1a", before, after, out)

    def run_tts(self, init_from: str):
        c = self.config("3.2", init_from)
        replies = demo_data.reply_texts()
        rng = np.random.default_rng(self.seed)
        held_idx = set(rng.permutation(len(replies))[:4].tolist())
        pairs = [(r, self.tok.encode(r), self.reply_codes(r)) for r in replies]
        train = [p for i, p in enumerate(pairs) if i not in held_idx]
        held = [p for i, p in enumerate(pairs) if i in held_idx]
        n_text = max(len(t) for _, t, _ in pairs)
        n_code = max(len(k) for *_, k in pairs)

        def batch(items):
            return stage_batches.tts_batch([t for _, t, _ in items], [k for *_, k in items], n_text, n_code)

        def make(i):
            order = np.random.default_rng((self.seed, i)).permutation(len(train))[:BATCH]
            return batch([train[k] for k in order])
        held_batch = batch(held)
        before = evaluate.speech_token_accuracy(c, program.initial_params(c), held_batch)
        out = trainer.train(c, os.path.join(self.wd, "3.2"), data=pipeline.IndexedBatches(make), log=self._stage_log,
                            progress=self.progress)
        after = evaluate.speech_token_accuracy(c, stages.merge(out["state"].train, out["state"].frozen), held_batch)
        self.held_replies = [r for r, *_ in held]
        return self._record("3.2", before, after, out)

    def run_codec(self):
        """Stage 3.1: the tiny codec trained by the trainer on 24 kHz pieces of the bundled ARCTIC
        recordings (two held out); before / after = the held-out mel L1 the run logs at steps 0 and last."""
        c = stages.stage_config("3.1", "tiny")
        train, held = demo_data.codec_wavs(os.path.join(self.wd, "data", "codec"), self.seed)
        c.data.update(train=[train], heldout=[held])
        c.total_steps = steps("3.1", self.budget)
        c.checkpoint_every = c.data.heldout_every = c.total_steps
        c.codec.learning_rate = PLAN["3.1"][4]
        c.seed = self.seed
        wd = os.path.join(self.wd, "3.1")
        out = trainer.train(c, wd, log=self._stage_log, progress=self.progress, return_state=False)
        held_rows = [r for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl"))) if "heldout/mel_l1" in r]
        return self._record("3.1", held_rows[0]["heldout/mel_l1"], held_rows[-1]["heldout/mel_l1"], out,
                            multires=(held_rows[0]["heldout/mel_l1_multires"],
                                      held_rows[-1]["heldout/mel_l1_multires"]))

    def reply_codes(self, text: str) -> np.ndarray:
        """Codec ids of a reply: each word's recording through the codec encoder, concatenated."""
        if getattr(self, "_codec_model", None) is None:
            self._codec_model = SpeechModel(TTSDecoderConfig(), None, codec=self.codec())
            self._word_codes = {}
        cm = self._codec_model
        out = []
        for w in demo_data.normalise(text).split():
            if w not in self._word_codes:
                wav = librosa.resample(self.speech.word(w), orig_sr=16000, target_sr=cm.sample_rate)
                hop = cm.codec_cfg.hop
                n = max(1, len(wav) // hop)
                fixed = np.zeros(hop * 48, np.float32)  # one length: one compilation of the encoder
                fixed[:min(len(wav), len(fixed))] = wav[:len(fixed)]
                self._word_codes[w] = cm.wave_to_codes(fixed)[0][:n]
            out.append(self._word_codes[w])
        return np.concatenate(out).astype(np.int32)

    def _stage_log(self, msg: str):
        self.log("  " + msg.replace("\n", "\n  "))

    def _record(self, stage, before, after, out, **extra):
        name, metric, higher, *_ = PLAN[stage]
        row = dict(stage=stage, description=name, metric=metric, before=round(float(before), 4),
                   after=round(float(after), 4), higher_is_better=higher, steps=int(out["steps"]),
                   final_loss=round(float(out["last"].get("loss", float("nan"))), 4),
                   seconds=round(time.perf_counter() - self._t_stage, 1),
                   checkpoint=os.path.join(self.wd, stage, "ckpt"))
        row.update({(k if k in ("multires", "nll") else f"{k}_accuracy"): [round(float(v), 4) for v in pair]
                    for k, pair in extra.items()})
        self.results.append(row)
        self.log(f"stage {stage}: {metric} {row['before']:.3f} -> {row['after']:.3f} ({row['seconds']:.0f} s)")
        return os.path.join(self.wd, stage, "model")

    # ------------------------------------------------------------------ everything
    def run(self, until: str | None = None) -> dict:
        """Every stage in order (``until``: stop after that stage, with no export or spoken answer);
        returns the summary also written to ``WORKDIR/summary.json``."""
        if until is not None and until not in PLAN:
            raise ValueError(f"--until {until}: not a demo stage (stages: {', '.join(PLAN)})")
        t0 = time.perf_counter()
        self.prepare()
        prev, final = "", {}
        for stage in PLAN:
            self._begin(stage)
            prev = self._run_one(stage, prev)
            if stage == until:
                break
        else:
            final = self.finish(prev)
        summary = dict(stages=self.results, speech=self.speech.source, codec=getattr(self, "codec_source", None),
                       **final, budget_minutes=self.budget, total_seconds=round(time.perf_counter() - t0, 1))
        with open(os.path.join(self.wd, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        self.log(format_summary(summary))
        return summary

    def _run_one(self, stage: str, prev: str) -> str:
        """One stage from the previous stage's model folder ``prev``; returns the folder the next starts from."""
        f = self.files
        mixtures = {  # stage -> (training files with weights, held-out file)
            "0": ([(f["text"][0], 1.0)], f["text"][1]),
            "1.1": ([(f["captions"][0], 1.0)], f["captions"][1]),
            # the stages that train the LLM replay stage 0's transcript task (text only, as the official recipe
            # mixes text data in): without it the LLM forgets how to write a transcript, which 2.1b's adapter
            # (LLM frozen) cannot teach it again
            "1.2": ([(f["photos"][0], 2.0), (f["captions"][0], 1.0), (f["replay"][0], 0.25)], f["photos"][1]),
            "1.3": ([(f["vqa"][0], 2.0), (f["photos"][0], 0.5), (f["captions"][0], 0.5), (f["replay"][0], 0.5)],
                    f["vqa"][1]),
            "2.1b": ([(f["asr"][0], 1.0)], f["asr"][1]),
            "2.2": ([(f["svqa"][0], 2.0), (f["vqa"][0], 0.5), (f["asr"][0], 0.5)], f["svqa"][1]),
            "lora": ([(f["sentences"][0], 1.0)], f["sentences"][1]),
        }
        if stage == "2.1a":
            self.run_ctc(prev)
            # the official 2.1b starts from the CTC-trained encoder: take it, with the rest of 1.3
            return self._merge_encoder(prev, os.path.join(self.wd, "2.1a", "model"))
        if stage == "3.1":
            self.run_codec()
            return prev
        if stage == "3.2":
            return self.run_tts(prev)
        if stage == "lora":  # a side branch: its model is WORKDIR/lora/model, 3.2 goes on from 2.2's
            self.run_stage(stage, prev, *mixtures[stage])
            return prev
        return self.run_stage(stage, prev, *mixtures[stage])

    def _begin(self, stage):
        self._t_stage = time.perf_counter()
        self.log(f"\n== stage {stage}: {PLAN[stage][0]} ({steps(stage, self.budget)} steps)")

    def _merge_encoder(self, base: str, ctc_model: str) -> str:
        m = api.from_pretrained(base)
        enc = api.from_pretrained(ctc_model).params["audio_encoder"]["encoder"]
        m.params["audio_encoder"]["encoder"] = enc
        path = os.path.join(self.wd, "2.1b-init")
        m.save_pretrained(path, format="orbax", overwrite=True)
        return path

    def finish(self, model_dir: str) -> dict:
        """Export to the official layout, read it back, answer a spoken question about an image."""
        for fname in os.listdir(self.tok_dir):
            shutil.copy2(os.path.join(self.tok_dir, fname), model_dir)
        m = api.from_pretrained(model_dir)
        m.speech = SpeechModel(m.speech.decoder_cfg, m.speech.decoder_params, codec=self.codec())
        export = os.path.join(self.wd, "export")
        t = time.perf_counter()
        m.save_pretrained(export, format="pytorch", overwrite=True)
        back = api.from_pretrained(export)
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree.leaves(m.params), jax.tree.leaves(back.params)))
        same = same and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                            zip(jax.tree.leaves(m.speech.decoder_params), jax.tree.leaves(back.speech.decoder_params)))
        self.log(f"\nexported to the official PyTorch layout: {export} (read back: "
                 f"{'identical' if same else 'DIFFERENT'}, {time.perf_counter() - t:.1f} s)")
        if back.speech.codec_cfg is None:  # no codec in the export (random codec): speak with the demo's
            back.speech = SpeechModel(back.speech.decoder_cfg, back.speech.decoder_params, codec=self.codec())
        held = json.load(open(self.files["svqa"][1]))[0]
        root = os.path.dirname(self.files["svqa"][1])
        image, audio = os.path.join(root, held["image"]), os.path.join(root, held["audio"][0])
        reply = back.chat("", image=image, audio=audio, max_new_tokens=16)
        wav = back.speak(reply, max_tokens=200)
        wav_path = os.path.join(self.wd, "answer.wav")
        sf.write(wav_path, wav, back.speech.sample_rate)
        expected = held["conversations"][1]["value"]
        self.log(f"spoken question {audio} about {image}\n  answer (text): {reply!r} (reference {expected!r})\n"
                 f"  answer (speech): {wav_path} ({len(wav) / back.speech.sample_rate:.2f} s)")
        return dict(export=export, export_round_trip_identical=bool(same),
                    answer=dict(image=image, question_audio=audio, text=reply, reference=expected, wav=wav_path))


def run_demo(workdir: str, budget_minutes: float = 15.0, until: str | None = None, **kw) -> dict:
    if until is not None and until not in PLAN:  # (checked again by run; here before the work dir is made)
        raise ValueError(f"--until {until}: not a demo stage (stages: {', '.join(PLAN)})")
    return Demo(workdir, budget_minutes, **kw).run(until)
