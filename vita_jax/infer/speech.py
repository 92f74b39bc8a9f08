"""Speech output: the NAR+AR decoder's code generation (and, with the codec, waveforms).

``load_speech(folder)`` reads a ``vita_tts_ckpt`` folder through :mod:`vita_jax.convert.tts`
(``decoder/{model.json,final.pt}``, ``codec/{model.json,final.pt}``).
"""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.convert import tts as tts_io
from vita_jax.data import batch as batch_lib
from vita_jax.models import ticodec
from vita_jax.models import tts_decoder as dec
from vita_jax.sizes import round_up

_take_rows = jax.jit(lambda table, ids: jnp.take(table, ids, axis=0).astype(jnp.float32))


def _id_bucket(n: int) -> int:
    """Ids padded to this many for an embedding-row lookup: powers of two from 16."""
    return batch_lib.bucket(int(n), 16)


def embedding_rows(table, ids: Sequence[int]) -> np.ndarray:
    """Rows of an embedding ``table [vocab, width]`` for ``ids`` -> ``[len(ids), width]`` float32 on the host; ids
    are padded to a power of two (at least 16) so that replies of any length share a few programs (a live server
    compiles them before serving: :func:`warm_embedding_rows`)."""
    n = len(ids)
    padded = np.zeros(_id_bucket(n), np.int32)
    padded[:n] = ids
    return np.asarray(_take_rows(table, padded))[:n]


def warm_embedding_rows(table, max_ids: int) -> int:
    """Compiles :func:`embedding_rows` for every length up to ``max_ids``; returns the number of programs."""
    sizes = sorted({_id_bucket(n) for n in range(int(max_ids) + 1)})
    for b in sizes:
        embedding_rows(table, [0] * b)
    return len(sizes)


class FifoLock:
    """A lock granted in the order it was asked for (``threading.Lock`` is not fair). The live server's turns
    share one codec through it: on a device that one decode already fills (2 CPU cores), decodes run side by side
    all end as late as the last one; in turn order the first turn's audio comes after one decode, not four."""

    def __init__(self):
        self._cv = threading.Condition()
        self._next = self._serving = 0

    def __enter__(self):
        with self._cv:
            ticket, self._next = self._next, self._next + 1
            while self._serving != ticket:
                self._cv.wait()

    def __exit__(self, *exc):
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


def _frames_last(out):
    """The encoder's ``(c [B, 512, T], g1, g2)`` -> ``(frames [B, T, 512], g1)``."""
    return out[0].transpose(0, 2, 1), out[1]


class SpeechModel:
    """The speech decoder (``decoder_cfg``, ``decoder_params``) and the TiCodec (``codec_cfg``,
    ``codec_raw``: the official state dicts, kept for export; ``codec_params``: the variables of the
    ``folded`` generator / encoder, weight norm folded at load, and the codebooks)."""

    def __init__(self, decoder_cfg: dec.TTSDecoderConfig, decoder_params, codec=None, path: Optional[str] = None):
        self.decoder_cfg, self.decoder_params, self.path = decoder_cfg, decoder_params, path
        self.codec_cfg, self.codec_raw, self.codec_params = codec if codec is not None else (None, None, None)
        self.decoder = dec.TTSDecoder(decoder_cfg)
        self._codec_turns = FifoLock()  # one waveform decode at a time, in the order asked (FifoLock)
        if self.codec_cfg is not None:
            gen, enc = ticodec.Generator(self.codec_cfg, folded=True), ticodec.Encoder(self.codec_cfg, folded=True)
            # [B, T, 512] frames -> [B, hop·T] waveform; [B, L] waveform -> ([B, L // hop, 512] frames, [B, 128])
            self._generate_wave = jax.jit(lambda v, x, g: gen.apply(v, x.transpose(0, 2, 1), g)[:, 0])
            self._encode_wave = jax.jit(lambda v, w: _frames_last(enc.apply(v, w[:, None])))
            self._nearest = jax.jit(ticodec.nearest)
        m = self.decoder
        self._forward = jax.jit(lambda p, *a: m.apply({"params": p}, *a)[:2])
        self._prefill = jax.jit(lambda p, x, k, v, n: m.apply({"params": p}, x, k, v, n, method=dec.TTSDecoder.prefill))
        # shape buckets (1 = exact shapes, as the release): decoder inputs padded to a multiple of
        # `x_bucket` rows, a stream's last codec chunk to a multiple of `codes_bucket` codes (its
        # last code repeated, output cut: the last few ms differ slightly). The live server sets
        # both so that replies of any length reuse a few compilations.
        self.x_bucket, self.codes_bucket = 1, 1
        self._step = jax.jit(lambda p, t, i, k, v: m.apply({"params": p}, t, i, k, v, method=dec.TTSDecoder.step))

    # ------------------------------------------------------------------ decoder
    def decoder_forward(self, x, x_lens, y, y_lens):
        """Teacher-forced: ``x [B, 4·n_text, idim]`` (zero-padded), ``y [B, max_codes]`` padded
        with -1 -> ``(logits [B, max_codes+1, V+4], summed CE loss)`` (float32 numpy / float)."""
        logits, loss = self._forward(self.decoder_params, jnp.asarray(x, jnp.float32), jnp.asarray(x_lens, jnp.int32),
                                     jnp.asarray(y, jnp.int32), jnp.asarray(y_lens, jnp.int32))
        return np.asarray(logits, np.float32), float(loss)

    def _cache(self, length: int, max_tokens: int):
        c = self.decoder_cfg
        slots = round_up(length + 2 + max_tokens, 64)
        shape = (c.num_blocks, 1, slots, c.attention_heads, c.idim // c.attention_heads)
        return jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype)

    def iter_codes(self, x, top_k: int = 2, max_tokens: int = 1000, seed: int = 0, penalty_window: int = -1,
                   penalty: float = 1.1, replay: Optional[Sequence[int]] = None, record: Optional[list] = None):
        """Yields ids one at a time as the official ``infer`` does: EOS ends the stream and is not
        yielded; the other special ids (``bos``, ``sos``, ``pad`` = ``odim``, ``odim+1``, ``odim+3``) are
        yielded and fed back like codes (callers that make sound skip them: :meth:`stream`). ``x [L, idim]``
        or ``[1, L, idim]``. ``replay`` feeds given ids instead of sampling (to check
        distributions); ``record`` collects ``(logits, probs)`` per step."""
        c = self.decoder_cfg
        x = jnp.asarray(x, jnp.float32)
        x = x[None] if x.ndim == 2 else x
        if x.shape[0] != 1:
            raise ValueError(f"generation takes one sequence, got a batch of {x.shape[0]}")
        if x.shape[1] == 0:
            return
        n = x.shape[1]
        x = jnp.pad(x, ((0, 0), (0, -n % self.x_bucket), (0, 0)))
        k, v = self._cache(x.shape[1], max_tokens)
        k, v = self._prefill(self.decoder_params, x, k, v, jnp.int32(n))
        index = n + 1
        key = jax.random.PRNGKey(seed)
        token, history = c.sos, [c.sos]
        for step in range(max_tokens):
            logits, k, v = self._step(self.decoder_params, jnp.asarray([token], jnp.int32), jnp.int32(index), k, v)
            logits = np.asarray(logits[0])
            probs = dec.sampling_distribution(logits, top_k, history, penalty_window, penalty)
            if record is not None:
                record.append((logits, probs))
            if replay is not None:
                if step >= len(replay):
                    return
                token = int(replay[step])
            elif top_k == 1:
                token = int(np.argmax(probs))
            else:
                key, sub = jax.random.split(key)
                token = int(jax.random.choice(sub, probs.shape[0], p=jnp.asarray(probs)))
            if token == c.eos:  # the official loop ends on EOS only; other special ids are yielded (see stream)
                return
            history.append(token)
            index += 1
            yield token

    def generate_codes(self, x, top_k: int = 2, max_tokens: int = 1000, seed: int = 0, penalty_window: int = -1,
                       penalty: float = 1.1) -> np.ndarray:
        """The official decoder's ids ``[n]`` (int64) without EOS, special ids included; at most ``max_tokens``."""
        return np.asarray(list(self.iter_codes(x, top_k, max_tokens, seed, penalty_window, penalty)), np.int64)


    # ------------------------------------------------------------------ codec
    def _need_codec(self):
        if self.codec_cfg is None:
            raise ValueError(f"{self.path}: no codec/ loaded")

    @property
    def sample_rate(self) -> int:
        return self.codec_cfg.sampling_rate

    def codes_to_wave(self, codes, global_tokens=None, stop=None) -> Optional[np.ndarray]:
        """Codec ids ``[T]`` (or ``[1, T]``) -> float32 waveform ``[hop·T]`` at the codec rate, with
        the config's fixed global tokens (the voice) unless given. ``stop()`` is asked once the codec is this
        call's (decodes are granted in turn order): True returns None without decoding (a turn cancelled while it
        queued for the codec gives the codec to the next turn at once)."""
        self._need_codec()
        codes = np.asarray(codes).reshape(-1)
        if codes.size == 0:
            return np.zeros(0, np.float32)
        if codes.min() < 0 or codes.max() >= self.codec_cfg.n_codes:
            raise ValueError(f"codec ids must be in [0, {self.codec_cfg.n_codes}), got {codes.min()}..{codes.max()}")
        gt = self.codec_cfg.global_tokens if global_tokens is None else np.asarray(global_tokens).reshape(-1)
        p = self.codec_params
        x = jnp.take(p["codebook"], jnp.asarray(codes), axis=0)[None]
        g = ticodec.global_vector(p, [int(t) for t in gt])[None]
        with self._codec_turns:
            if stop is not None and stop():
                return None
            return np.asarray(self._generate_wave(p["generator"], x, g)[0], np.float32)

    def wave_to_codes(self, wave):
        """Waveform at the codec rate ``[L]`` -> ``(codes [L // hop], global_tokens [8])``."""
        self._need_codec()
        if "encoder" not in self.codec_params:
            raise ValueError(f"{self.path}: the codec checkpoint has no encoder")
        w = jnp.asarray(np.asarray(wave, np.float32).reshape(1, -1))
        frames, g = self._encode_wave(self.codec_params["encoder"], w)
        codes = self._nearest(frames[0], self.codec_params["codebook"])
        d = g.shape[-1] // self.codec_cfg.global_code_num
        gt = [int(self._nearest(g[:, j * d:(j + 1) * d], cb)[0])
              for j, cb in enumerate(self.codec_params["globaltokens"])]
        return np.asarray(codes, np.int64), np.asarray(gt, np.int64)

    def stream(self, codes_or_x, chunk_size: int = 40, padding_size: int = 10, seg_threshold: float = 0.015,
               window: int = 2401, top_k: int = 2, seed: int = 0, max_tokens: int = 1000, global_tokens=None,
               stop=None):
        """The official chunked decode (``llm2TTS.run``): ids come from ``codes_or_x`` (codec ids, decoder
        input vectors that are decoded on the fly, or any other iterable of ids, e.g. a
        :class:`~vita_jax.infer.speech_scheduler.CodeStream`); every ``chunk_size`` new ids (+
        ``padding_size`` look-ahead, ``padding_size`` left context) a chunk is synthesised and cut at
        a quiet point; yields float32 waveform segments as soon as they exist. ``stop()`` returning
        True ends the stream between two decoder steps or once a queued codec decode is granted, with nothing
        more yielded.

        A special id of the decoder (``>= odim``: BOS, SOS or PAD drawn mid-reply; the release's codec
        would index out of range on it and crash) carries no sound: it is skipped and the stream goes on
        with the codes after it. Any other id outside the codebook is an error."""
        self._need_codec()
        if not isinstance(codes_or_x, (np.ndarray, jax.Array, list, tuple)):  # codes as they come (an engine's)
            source = iter(codes_or_x)
        elif np.issubdtype((arr := np.asarray(codes_or_x)).dtype, np.integer):
            source = iter(arr.reshape(-1).tolist())
        else:
            source = self.iter_codes(arr, top_k=top_k, max_tokens=max_tokens, seed=seed)
        hop, left, tokens, buffer = SAMPLES_PER_ID, 0, [], np.zeros(0, np.float32)
        special = self.decoder_cfg.odim
        for tok in source:
            if stop is not None and stop():
                return
            if special <= int(tok) < special + 4:
                continue
            tokens.append(int(tok))
            if len(tokens) == left + chunk_size + padding_size:
                syn = self.codes_to_wave(tokens, global_tokens, stop)
                if syn is None:  # cancelled while queued for the codec
                    return
                syn = syn[left * hop:-padding_size * hop]
                left, tokens = padding_size, tokens[-2 * padding_size:]
                buffer, out = find_min_sum_index(buffer, syn, window, seg_threshold)
                if out is not None:
                    yield out
        if tokens and not (stop is not None and stop()):
            padded = tokens + tokens[-1:] * (-len(tokens) % self.codes_bucket)
            syn = self.codes_to_wave(padded, global_tokens, stop)
            if syn is not None:
                yield np.concatenate([buffer, syn[left * hop:len(tokens) * hop]])

    # ------------------------------------------------------------------ export
    def save(self, path: str) -> None:
        """Writes the official ``vita_tts_ckpt`` folder (decoder, and codec when loaded)."""
        tts_io.write(path, self.decoder_cfg, self.decoder_params, self.codec_cfg, self.codec_raw, self.path)



PUNCTUATION = set(",，.。?？!！、\n")


class ReplySplitter:
    """The release server's text pieces, cut as the text arrives: ``push(more_text)`` returns the
    pieces it completes, ``finish()`` the rest. A piece ends at punctuation once it holds >=
    ``min_chars`` characters; state symbols, ``<unk>`` and ``<|im_end|>`` are removed, text
    lower-cased, and in the first piece commas become full stops (its spelling-out of math symbols
    is not reproduced). Pieces are the same however the text is split into pushes."""

    def __init__(self, min_chars: int = 5):
        self.min_chars, self.text, self.done, self.count = min_chars, "", 0, 0

    def push(self, text: str) -> list[str]:
        self.text += text
        return self._cut(final=False)

    def finish(self) -> list[str]:
        return self._cut(final=True)

    def _cut(self, final: bool) -> list[str]:
        clean = self.text
        for sym in ("☞", "☟", "☜", "<unk>", "<|im_end|>"):
            clean = clean.replace(sym, "")
        pieces, cur = [], ""
        for i in range(self.done, len(clean)):
            cur += clean[i]
            if clean[i] in PUNCTUATION and len(cur.strip()) >= self.min_chars:
                pieces.append(cur.strip())
                cur, self.done = "", i + 1
        if final and cur.strip():
            pieces.append(cur.strip())
        if final:
            self.done = len(clean)
        out = []
        for p in pieces:
            if self.count == 0:
                p = p.replace(",", ".").replace("，", "。")
            self.count += 1
            out.append(p.lower())
        return out


def split_reply(text: str, min_chars: int = 5) -> list[str]:
    """All pieces of a whole reply (:class:`ReplySplitter`)."""
    s = ReplySplitter(min_chars)
    return s.push(text) + s.finish()


def trim_leading(wav: np.ndarray, level: float = 0.03) -> np.ndarray:
    """The server drops the first sentence's leading samples until |x| > level."""
    loud = np.nonzero(np.abs(wav) > level)[0]
    return wav[loud[0]:] if len(loud) else wav[:0]


def load_speech(path: str) -> SpeechModel:
    """A ``vita_tts_ckpt`` folder (``decoder/`` and ``codec/``) -> :class:`SpeechModel`."""
    cfg, params, codec = tts_io.read(path)
    return SpeechModel(cfg, params, codec, path)


load_codec = tts_io.load_codec  # the codec alone: (config, raw state dicts, folded params)



# ------------------------------------------------------------------------------------ codec
SAMPLES_PER_ID = 600  # hard-coded by the official streaming code (24 kHz / 40 Hz)


def find_min_sum_index(buffer: np.ndarray, syn: np.ndarray, n: int, threshold: float):
    """The official cut search: the quietest ``n``-sample window in the second half of ``syn``;
    if its mean ``|x|`` is under ``threshold`` cut at the quietest sample (the search span keeps
    the official doubled offset) and return ``(new buffer, buffer + head)``, else hold everything."""
    a = np.asarray(syn, np.float32).reshape(-1)
    length = len(a)
    s0 = length // 2 - n // 2
    c = np.concatenate([[0.0], np.cumsum(np.abs(a).astype(np.float64))])
    w = (c[n:] - c[:-n])[s0:]
    j = int(np.argmin(w))
    m = float(w[j])
    start = max(0, j + s0)
    end = min(length, j + n + start)
    cut = start + int(np.argmin(np.abs(a[start:end])))
    if m / n < threshold:
        return a[cut:], np.concatenate([buffer, a[:cut]])
    return np.concatenate([buffer, a]), None
