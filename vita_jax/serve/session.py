"""One conversation of the live server, without the network: audio in, VAD, turns, text and audio out.

A :class:`Session` takes 16 kHz int16 PCM (any chunk length), video frames and typed text from one client and emits
the protocol's messages through ``sink(item)``: ``item`` is a dict (a JSON message) or ``bytes`` (24 kHz mono int16
PCM of the answer). At ``speech_end`` the segment (with the latest video frame as an image, and the previous turn as
history) becomes a :class:`Turn`: its prompt is built and run by the shared
:class:`~vita_jax.serve.engine.ServeEngine`, text is sent as it is decoded (on the turn's own text thread: the
engine's thread only queues the ids), and the speech decoder starts on a thread of its own as soon as the first text
piece is complete (the release's cut rules, :class:`~vita_jax.infer.speech.ReplySplitter`), so audio is sent while
the LLM still writes. A new ``speech_start`` (or typed text) during an answer cancels it: ``stop_tts`` is sent and,
under the same lock, nothing more of that answer is.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import itertools
import logging
import queue
import threading
import time
import warnings
import weakref
from typing import Callable, Optional

import numpy as np
from PIL import Image

from vita_jax.data import image as image_lib
from vita_jax.infer import compiles
from vita_jax.infer import vad as vad_lib
from vita_jax.infer.speech import ReplySplitter
from vita_jax.serve.engine import Request, ServeEngine

log = logging.getLogger(__name__)
# every turn's speech thread: a cancelled turn's thread may still be in a codec decode after its session closed,
# and a daemon thread inside an XLA call when the interpreter exits aborts the process (join_speakers first)
_speakers: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
_speakers_lock = threading.Lock()


def join_speakers(timeout: float = 60.0) -> bool:
    """Waits up to ``timeout`` s in all for every turn's speech thread to end (call after the sessions closed,
    before the engine closes; one started meanwhile is waited for too); True when none is left."""
    end = time.perf_counter() + timeout
    while True:
        with _speakers_lock:
            alive = [t for t in _speakers if t.is_alive()]
        if not alive or time.perf_counter() >= end:
            return not alive
        for t in alive:
            t.join(max(0.0, end - time.perf_counter()))


STATE_SYMBOLS = ("☞", "☟", "☜")
MAX_FRAME_PIXELS = 4096 * 4096  # a camera frame; a header claiming more is refused before anything is decoded
_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class TurnOptions:
    """Per-server answer settings: LLM tokens, image tiles of a video frame, speech decoder tokens
    per piece and sampling (``tts_top_k``, ``seed``), ``first`` / ``later`` = (codes per chunk, cut
    threshold) of the first and later pieces (the release's (20, 0.1) and (40, 0.015))."""
    max_new_tokens: int = 128
    image_tiles: int = 1
    tts_max_tokens: int = 500
    tts_top_k: int = 2
    seed: int = 0
    first: tuple = (20, 0.1)
    later: tuple = (40, 0.015)
    padding_size: int = 10


class Turn:
    """One question and its answer; times are ``time.perf_counter()`` seconds."""

    def __init__(self, session: "Session", question: Optional[str], clip: Optional[np.ndarray], image, history, t0):
        self.id, self.session = next(_ids), session
        self.question, self.clip, self.image, self.history, self.t0 = question, clip, image, history, t0
        self.compiles0 = compiles.count()  # XLA compilations in the process while the turn runs (0 when warm)
        self.cancelled = threading.Event()
        self.ids: list[int] = []
        self.raw, self.shown = "", ""
        self.window = 0  # ids before it are in `raw` for good: each token decodes only the ids since (incremental)
        self.splitter = ReplySplitter()
        self.pieces: queue.Queue = queue.Queue()
        self.tts: Optional[threading.Thread] = None
        # the engine's calls for this turn (ids, then the end), handled in order on the turn's text thread
        self.from_engine: queue.Queue = queue.Queue()
        self.t_text = self.t_audio = None
        self.samples = 0
        self.llm_info: dict = {}
        self.finished = threading.Event()   # LLM and speech both done (or cancelled)

    def prompt(self):
        """``(input_ids, pixels, fbank clips)`` for the engine (runs on its thread)."""
        m, opts = self.session.model, self.session.opts
        audio = None if self.clip is None else (self.clip, vad_lib.RATE)
        msgs = list(self.history) + [("user", self.question or "")]
        ex = m.chat_inputs(msgs if self.history else (self.question or ""), image=self.image, audio=audio,
                           max_tiles=opts.image_tiles)
        return ex["input_ids"], ex["pixels"], ex["audio"]


class Session:
    """See the module docstring. ``model`` is the engine's; ``vad`` a :class:`~vita_jax.infer.vad.VADConfig`;
    ``vad_weights`` the loaded Silero weights (shared by sessions); ``sink`` is called with each
    outgoing item from the caller's, the engine's or a speech thread, always under the session lock."""

    def __init__(self, engine: ServeEngine, sink: Callable, opts: TurnOptions = TurnOptions(),
                 vad: vad_lib.VADConfig = vad_lib.VADConfig(), vad_weights: Optional[dict] = None):
        self.engine, self.model, self.sink, self.opts = engine, engine.model, sink, opts
        self.segmenter = vad_lib.Segmenter(vad, vad_weights)
        self.lock = threading.RLock()
        self.turn: Optional[Turn] = None
        self.history: list = []
        self.image = None
        self.playback_end = 0.0   # when the client will have played what was sent (estimate)
        self.closed = False
        self.out_rate = self.model.speech.sample_rate if self.model.speech is not None else 24000

    # ------------------------------------------------------------------ input
    def audio(self, pcm) -> None:
        """16 kHz mono int16 PCM: little-endian ``bytes`` (even length) or an int16 array."""
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            if len(pcm) % 2:
                raise ValueError(f"binary frame of {len(pcm)} bytes: 16-bit PCM needs an even length")
            pcm = np.frombuffer(pcm, "<i2")
        for kind, segment, _ in self.segmenter.feed(np.asarray(pcm, np.float32) / 32768.0):
            now = time.perf_counter()
            if kind == "speech_start":
                self._interrupt()
                self._send({"type": "vad", "state": "speech_start"})
            else:
                self._send({"type": "vad", "state": "speech_end"})
                if segment is not None:
                    self._start(None, segment, now)

    def video_frame(self, data: str) -> None:
        """A base64 JPEG or PNG; the latest one goes with the next question as its image. Whatever the
        bytes are (not an image, truncated, a header claiming a huge bitmap), a bad frame is a
        ``ValueError`` (sent back as ``error``), checked from the header before it is decoded."""
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"video_frame: image is not base64 JPEG/PNG ({e})") from e
        f = io.BytesIO(raw)
        f.name = "video_frame"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                head = Image.open(f)  # the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"video_frame: the header claims a bitmap over Pillow's decompression-bomb limit "
                             f"({' '.join(str(e).split())})") from None
        except Exception as e:  # any decoder's complaint about a client's bytes is a bad frame
            raise ValueError(f"video_frame: not a readable JPEG or PNG ({' '.join(str(e).split())[:200]})") from None
        if head.format not in ("JPEG", "PNG"):
            raise ValueError(f"video_frame: image must be JPEG or PNG, got {head.format}")
        w, h = head.size
        if w * h > MAX_FRAME_PIXELS:
            raise ValueError(f"video_frame: a {w}x{h} image, at most {MAX_FRAME_PIXELS} pixels (a camera frame)")
        f.seek(0)
        self.image = image_lib.load_image(f)  # ImageError (a ValueError) naming video_frame: truncated, ...

    def text(self, text: str) -> None:
        """A typed question: answers at once (cancelling an answer in progress)."""
        self._interrupt()
        self._start(text, None, time.perf_counter())

    def reset(self) -> None:
        """Forgets the history, the image and the VAD state; cancels an answer in progress."""
        self._interrupt()
        with self.lock:
            self.history, self.image = [], None
            self.segmenter.reset()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.turn is not None:
                self.turn.cancelled.set()

    @property
    def busy(self) -> bool:
        return self.turn is not None and not self.turn.finished.is_set()

    # ------------------------------------------------------------------ output
    def _send(self, item, turn: Optional[Turn] = None) -> bool:
        """Sends unless ``turn`` was cancelled (checked under the lock that cancelling takes)."""
        with self.lock:
            if self.closed or (turn is not None and turn.cancelled.is_set()):
                return False
            try:
                self.sink(item)
            except Exception:  # a closed connection: the session ends, the engine goes on
                log.debug("sink failed", exc_info=True)
                return False
            return True

    def _interrupt(self) -> None:
        """Barge-in: cancels the answer in progress (or still playing on the client) with ``stop_tts``."""
        with self.lock:
            t = self.turn
            playing = time.perf_counter() < self.playback_end
            if t is not None and (not t.finished.is_set() or playing):
                t.cancelled.set()
                self.playback_end = 0.0
                self._send({"type": "stop_tts"})

    # ------------------------------------------------------------------ a turn
    def _start(self, question, clip, t0) -> None:
        with self.lock:
            if self.closed:
                return
            turn = self.turn = Turn(self, question, clip, self.image, list(self.history), t0)
        # the engine thread only queues: detokenising, sending and cutting speech pieces run on the turn's text
        # thread, never between two decode steps; it ends with the turn's end (the engine ends every request once)
        req = Request(turn.prompt, turn.from_engine.put, lambda reason, info: turn.from_engine.put((reason, info)),
                      max_new_tokens=self.opts.max_new_tokens, cancelled=turn.cancelled)
        text = threading.Thread(target=self._text, args=(turn,), name=f"vita-serve-text-{turn.id}", daemon=True)
        try:
            text.start()
            self.engine.submit(req)
        except BaseException:  # the turn ends all the same (on its thread if that started)
            if text.is_alive():
                turn.from_engine.put(("cancelled", {}))
            else:
                self._on_llm_done(turn, "cancelled", {})
            raise

    def _text(self, turn: Turn) -> None:
        """The turn's text thread: each id the engine delivers, then its end (see _start)."""
        while True:
            item = turn.from_engine.get()
            try:
                if isinstance(item, tuple):
                    return self._on_llm_done(turn, *item)
                self._on_token(turn, item)
            except Exception:  # a failing send or callback must not leave the turn unended
                log.exception("turn %s: text output failed", turn.id)
                if isinstance(item, tuple):
                    turn.pieces.put(None)  # a speech thread already started ends too
                    return self._end(turn)

    def _on_token(self, turn: Turn, tok: int) -> None:
        turn.ids.append(tok)
        # only the ids since the last complete text are decoded (the whole reply each token cost O(n) per token);
        # the byte-level BPE decodes a run of whole characters the same alone as after its prefix
        text = self.model.tokenizer.decode(turn.ids[turn.window:])
        if text.endswith("\ufffd"):  # a character still incomplete (bytes of it in later tokens)
            return
        turn.window = len(turn.ids)
        turn.raw += text
        self._text_out(turn, text, final=False)

    def _text_out(self, turn: Turn, raw_new: str, final: bool) -> None:
        shown = turn.raw
        for s in STATE_SYMBOLS:
            shown = shown.replace(s, "")
        new, turn.shown = shown[len(turn.shown):], shown
        if (new or final) and self._send({"type": "response_text", "text": new, "final": final}, turn):
            if turn.t_text is None and new:
                turn.t_text = time.perf_counter()
        pieces = turn.splitter.push(raw_new) + (turn.splitter.finish() if final else [])
        if self.model.speech is None:
            return
        for p in pieces:
            turn.pieces.put(p)
        if pieces and turn.tts is None and not (self.closed or turn.cancelled.is_set()):
            turn.tts = threading.Thread(target=self._speak, args=(turn,), name=f"vita-serve-tts-{turn.id}", daemon=True)
            with _speakers_lock:
                _speakers.add(turn.tts)
            turn.tts.start()

    def _on_llm_done(self, turn: Turn, reason: str, info: dict) -> None:
        turn.llm_info = dict(info, reason=reason)
        if reason == "error":
            self._send({"type": "error", "message": info.get("message", "the answer failed")}, turn)
        if reason in ("error", "cancelled"):
            turn.pieces.put(None)
            return self._end(turn)
        self._text_out(turn, "", final=True)
        turn.pieces.put(None)
        if turn.tts is None:
            self._end(turn)

    def _speak(self, turn: Turn) -> None:
        o = self.opts

        def pieces():
            while (p := turn.pieces.get()) is not None:
                yield p
        try:
            for seg in self.model.speak_stream(pieces(), top_k=o.tts_top_k, seed=o.seed, max_tokens=o.tts_max_tokens,
                                               first=o.first, later=o.later, padding_size=o.padding_size,
                                               stop=turn.cancelled.is_set, engine=self.engine.speech):
                pcm = (np.clip(seg, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
                with self.lock:
                    if self._send(pcm, turn):
                        now = time.perf_counter()
                        turn.t_audio = turn.t_audio or now
                        turn.samples += len(seg)
                        self.playback_end = max(self.playback_end, now) + len(seg) / self.out_rate
        except Exception as e:  # the speech decoder failed: text was sent; say so and end the turn
            log.exception("speech synthesis failed")
            self._send({"type": "error", "message": f"speech synthesis failed: {e!r}"}, turn)
        self._end(turn)

    def _end(self, turn: Turn) -> None:
        with self.lock:
            if turn.finished.is_set():  # once (a failed end and the speech thread may both end it)
                return
            if not turn.cancelled.is_set() and turn.llm_info.get("reason") in ("stop", "length"):
                ms = lambda t: None if t is None else round(1000 * (t - turn.t0), 1)  # noqa: E731
                info = turn.llm_info
                self._send({"type": "turn_metrics", "turn": turn.id, "speech_end_to_first_text_ms": ms(turn.t_text),
                            "speech_end_to_first_audio_ms": ms(turn.t_audio),
                            "audio_seconds": round(turn.samples / self.out_rate, 3),
                            "question_seconds": None if turn.clip is None else round(len(turn.clip) / vad_lib.RATE, 3),
                            "llm_tokens": info.get("tokens", 0), "prefill_ms": round(info.get("prefill_ms", 0.0), 1),
                            "queue_ms": round(info.get("queue_ms", 0.0), 1),
                            "llm_tokens_per_s": round(info.get("tokens", 0) / max(info.get("decode_s", 0.0), 1e-6), 1),
                            "stop": info.get("reason"), "compiles": compiles.count() - turn.compiles0}, turn)
                if turn.shown.strip():  # an empty reply would read as an open assistant turn
                    self.history = [("user", turn.question or "",
                                     None if turn.clip is None else (turn.clip, vad_lib.RATE)),
                                    ("assistant", turn.shown.strip())]
            turn.finished.set()
