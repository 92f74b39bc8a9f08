"""``vita-jax serve``: the asyncio WebSocket server (``websockets``) with the page at ``/`` and the
protocol at ``/ws`` (docs/serving.md). One :class:`~vita_jax.serve.engine.ServeEngine`
holds the model; each connection is a :class:`~vita_jax.serve.session.Session`.

Safety: loopback unless ``host`` says otherwise; the ``Origin`` header must be this server's own
page (or absent: non-browser clients) or one of ``allow_origins``; frames over ``max_message``
bytes close the connection (1009), binary frames over 1 s of audio or of odd length and bad JSON
get an ``error`` message; a client sending faster than ``rate_limit`` messages/s (or audio faster
than 4x real time) is closed (1008); beyond ``max_sessions`` a client gets ``busy`` and a close.
"""
from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import threading
import time
from typing import Optional, Sequence

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from vita_jax import parallel
from vita_jax.infer import vad as vad_lib
from vita_jax.serve import session as session_lib
from vita_jax.serve.engine import ServeEngine
from vita_jax.serve.session import Session, TurnOptions

log = logging.getLogger(__name__)
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
         "/worklet.js": ("worklet.js", "text/javascript; charset=utf-8")}
MAX_AUDIO_BYTES = 32000          # 1 s of 16 kHz int16 per binary frame
MAX_TEXT_CHARS = 4000


class Bucket:
    """A token bucket: ``take(n)`` is False once more than ``burst`` arrived faster than ``rate``/s."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.level, self.t = rate, burst, burst, time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.t) * self.rate)
        self.t = now
        self.level -= n
        return self.level >= 0


class Server:
    """The live server around one engine. ``await start(host, port)`` binds (port 0: any free port,
    then ``self.port``); ``await stop()`` closes it."""

    def __init__(self, engine: ServeEngine, max_sessions: int = 4, opts: TurnOptions = TurnOptions(),
                 vad: vad_lib.VADConfig = vad_lib.VADConfig(), allow_origins: Sequence[str] = (),
                 max_message: int = 4 * 2 ** 20, rate_limit: float = 200.0):
        self.engine, self.max_sessions, self.opts, self.vad = engine, int(max_sessions), opts, vad
        self.vad_weights = vad_lib.load_weights()   # read once, shared by every session
        self.allow_origins, self.max_message, self.rate_limit = list(allow_origins), int(max_message), rate_limit
        self.sessions: set = set()
        self.server = None
        self.host, self.port = None, None
        self.stats = dict(connections=0, busy=0, errors=0)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 8765) -> "Server":
        self.host = host
        self.server = await serve(self._handler, host, port, process_request=self._http, origins=None,
                                  max_size=self.max_message, max_queue=64, ping_interval=20, ping_timeout=20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Closes every connection, then waits for their turns' speech threads (see ``session.join_speakers``)."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for s in list(self.sessions):
            s.close()
        if not await asyncio.to_thread(session_lib.join_speakers):
            log.warning("a turn's speech thread is still running after 60 s")

    def _origin_ok(self, origin: Optional[str]) -> bool:
        if origin is None:  # not a browser (browsers always send Origin on WebSocket requests)
            return True
        own = {f"http://{h}:{self.port}" for h in {self.host, "127.0.0.1", "localhost", "[::1]"}}
        return origin in own or origin in self.allow_origins

    # ------------------------------------------------------------------ HTTP: the page, then the origin check
    def _http(self, conn: ServerConnection, request):
        path = request.path.split("?", 1)[0]
        if path == "/ws":
            if not self._origin_ok(request.headers.get("Origin")):
                return conn.respond(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
            return None  # the WebSocket handshake goes on
        if path not in PAGES:
            return conn.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        name, ctype = PAGES[path]
        with open(os.path.join(STATIC, name), encoding="utf-8") as fh:
            resp = conn.respond(http.HTTPStatus.OK, fh.read())
        del resp.headers["Content-Type"]
        resp.headers["Content-Type"] = ctype
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        return resp

    # ------------------------------------------------------------------ one connection
    async def _handler(self, ws: ServerConnection) -> None:
        self.stats["connections"] += 1
        if len(self.sessions) >= self.max_sessions:
            self.stats["busy"] += 1
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "busy"}))
                await ws.close(1013, "session limit reached")
            return
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def sink(item):  # called from any thread, under the session lock: order is kept
            loop.call_soon_threadsafe(out.put_nowait, item)
        session = Session(self.engine, sink, self.opts, self.vad, self.vad_weights)
        self.sessions.add(session)
        sender = asyncio.create_task(self._send_loop(ws, out))
        msgs, audio = Bucket(self.rate_limit, 2 * self.rate_limit), Bucket(4 * 32000, 10 * 32000)
        try:
            async for msg in ws:
                if not msgs.take() or (isinstance(msg, bytes) and not audio.take(len(msg))):
                    await self._error(ws, "too many messages: slow down (the connection is closed)")
                    await ws.close(1008, "rate limit")
                    break
                try:
                    self._dispatch(session, msg)
                except ValueError as e:
                    await self._error(ws, str(e))
                except Exception as e:  # a bug on one frame: logged, answered, the session goes on
                    log.exception("frame failed")
                    await self._error(ws, f"internal error on this message ({type(e).__name__}); the session goes on")
        except ConnectionClosed:
            pass
        finally:
            session.close()
            self.sessions.discard(session)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender

    async def _error(self, ws, message: str) -> None:
        self.stats["errors"] += 1
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "error", "message": message}))

    @staticmethod
    async def _send_loop(ws, out: asyncio.Queue) -> None:
        while True:
            item = await out.get()
            await ws.send(item if isinstance(item, bytes) else json.dumps(item, ensure_ascii=False))

    @staticmethod
    def _dispatch(session: Session, msg) -> None:
        """One client frame -> the session; ``ValueError`` (sent back as ``error``) for a bad one."""
        if isinstance(msg, bytes):
            if len(msg) > MAX_AUDIO_BYTES:
                raise ValueError(f"binary frame of {len(msg)} bytes: at most {MAX_AUDIO_BYTES} (1 s of 16 kHz int16)")
            return session.audio(msg)
        try:
            m = json.loads(msg)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON: {e}") from e
        except RecursionError:
            raise ValueError("malformed JSON: nested too deeply") from None
        if not isinstance(m, dict) or not isinstance(m.get("type"), str):
            raise ValueError('a text frame must be a JSON object with a string "type"')
        kind = m["type"]
        if kind == "video_frame":
            if not isinstance(m.get("image"), str):
                raise ValueError('video_frame: "image" must be a base64 string')
            return session.video_frame(m["image"])
        if kind == "text":
            if not isinstance(m.get("text"), str) or not m["text"].strip():
                raise ValueError('text: "text" must be a non-empty string')
            if len(m["text"]) > MAX_TEXT_CHARS:
                raise ValueError(f"text: at most {MAX_TEXT_CHARS} characters")
            return session.text(m["text"])
        if kind == "reset":
            return session.reset()
        raise ValueError(f"unknown message type {kind!r} (expected video_frame, text or reset)")


@contextlib.contextmanager
def in_thread(engine: ServeEngine, host: str = "127.0.0.1", port: int = 0, **kw):
    """A :class:`Server` on an event loop of its own thread (tests, the bench): ``with in_thread(engine,
    max_sessions=2) as srv: ... srv.port``; stopped (connections closed) on leaving."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="vita-serve-loop", daemon=True)
    thread.start()
    srv = asyncio.run_coroutine_threadsafe(Server(engine, **kw).start(host, port), loop).result(60)
    try:
        yield srv
    finally:
        try:  # stop() waits up to 60 s for the turns' speech threads
            asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(120)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)


def _warm_codec(speech, opts: TurnOptions) -> None:
    """Compiles the codec for every chunk length a reply's stream can synthesise: a full chunk (``chunk`` +
    look-ahead, after the first also the left context) and a last one (padded to ``codes_bucket`` codes)."""
    if speech is None or speech.codec_cfg is None:
        return
    pad, step = opts.padding_size, max(1, speech.codes_bucket)
    full = {left + chunk + pad for chunk, _ in (opts.first, opts.later) for left in (0, pad)}
    for n in sorted(full | set(range(step, max(full) + 1, step))):
        speech.codes_to_wave(np.zeros(n, np.int64))


def warm_up(engine: ServeEngine, opts: TurnOptions, clip_seconds: Sequence[float] = (2, 4, 6, 8)) -> float:
    """Compiles before serving: every prompt shape (towers per tile count and clip length, splice and prefill per
    prompt length: ``ServeEngine.warm_prompts``), the codec's chunk lengths, then a typed turn and one spoken turn
    (real speech, looped or cut) per length in ``clip_seconds`` for the rest of a turn's path (decode steps, the
    speech decoder, sampling); returns the seconds it took."""
    from vita_jax import assets  # the bundled recordings: only the warm-up speaks
    t0 = time.perf_counter()
    engine.warm_prompts()
    _warm_codec(engine.model.speech, opts)
    wave = np.concatenate([c[1] for c in assets.speech_clips()[:2]])
    for secs in [None, *clip_seconds]:
        done = threading.Event()
        s = Session(engine, lambda item: done.set() if isinstance(item, dict) and item["type"] in (
            "turn_metrics", "error") else None, opts)
        if secs is None:
            s.text("Hello, who are you?")
        else:
            s._start(None, np.resize(wave, int(secs * vad_lib.RATE)), time.perf_counter())
        done.wait(600)
    return time.perf_counter() - t0


def main(checkpoint: str, host: str = "127.0.0.1", port: int = 8765, max_sessions: int = 4, dtype: str = "auto",
         max_new_tokens: int = 128, max_prompt: Optional[int] = None, image_tiles: int = 1,
         allow_origins: Sequence[str] = (), warmup: bool = True, quantize: Optional[str] = None, mesh=None) -> int:
    """Loads the model, warms it up and serves until interrupted (``vita-jax serve``)."""
    import jax.numpy as jnp  # the model's dtype; jax is loaded by the engine anyway

    from vita_jax import api  # (as above: the CLI imports serve only when it runs)
    if not 1 <= max_sessions <= 64:
        raise ValueError(f"--max-sessions must be in 1..64, got {max_sessions}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    for opt, value in (("--image-tiles", image_tiles), ("--max-prompt", max_prompt),
                       ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{opt} must be at least 1, got {value}")
    vad_lib.weights_path()  # a missing serve extra fails before the model is loaded
    t0 = time.perf_counter()
    dtype = parallel.resolve_dtype(dtype)
    model = api.from_pretrained(checkpoint, dtype=jnp.dtype(dtype), mesh=mesh)
    if quantize:
        model.quantize(quantize)
    if model.tokenizer is None:
        raise ValueError(f"{checkpoint}: no tokenizer.json, the server needs one")
    if model.speech is None:
        log.warning("%s has no vita_tts_ckpt/: answers are text only", checkpoint)
    opts = TurnOptions(max_new_tokens=max_new_tokens, image_tiles=image_tiles)
    engine = ServeEngine(model, slots=max_sessions, max_new_tokens=max_new_tokens, max_prompt=max_prompt,
                         max_tiles=image_tiles + int(model.prep.use_thumbnail and image_tiles > 1),
                         speech_max_tokens=opts.tts_max_tokens)
    print(f"loaded {checkpoint} in {time.perf_counter() - t0:.1f} s ({dtype}"
          f"{', LLM weights ' + quantize if quantize else ''})", flush=True)
    if warmup:
        print(f"warmed up (compiled) in {warm_up(engine, opts):.1f} s", flush=True)

    async def serve_forever():
        srv = await Server(engine, max_sessions, opts, allow_origins=allow_origins).start(host, port)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"WARNING: listening on {host}: reachable from other machines", flush=True)
        print(f"serving http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{srv.port}/ "
              f"(WebSocket /ws, {max_sessions} sessions)", flush=True)
        await asyncio.Future()
    try:
        asyncio.run(serve_forever())
    finally:
        session_lib.join_speakers()  # a speech thread still in an XLA call at exit would abort the process
        engine.close()
    return 0
