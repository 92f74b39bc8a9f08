"""``python -m vita_jax.bench serve``: N simulated clients (1, 2, 4, 8 by default) talk to a live
``vita-jax serve`` in this process over real WebSockets, replaying real speech (the bundled CMU
ARCTIC recordings) at real-time pace in 100 ms chunks.

After a warm-up (server.warm_up and one unmeasured client round), per client and turn: the question,
1.2 s of silence (the VAD's 500 ms end rule closes it), the answer is awaited, then ``reset`` (no
history, so every turn has warm shapes); the last turn of each client is interrupted (barge-in) by the next question as
soon as the answer's first text arrives. Printed per N: p50 / p95 of speech end -> first text and
-> first audio (the server's ``turn_metrics``, measured from its ``speech_end``), of barge-in ->
``stop_tts`` (client side: from sending the chunk where the barge-in speech begins to receiving
``stop_tts``; includes the VAD's detection delay), and the real-time factor of the audio produced
(RTF = seconds from speech end to the last audio chunk / seconds of audio; < 1 keeps ahead of
playback), the engine's mean rows per decode step, and turns that failed.

Without ``--checkpoint`` the model is the tests' tiny one: a random 2-layer 64-wide VITA with the
real Qwen2.5 tokenizer and the fixtures' speech decoder + codec (``--fixtures``, default
``../shared/fixtures`` beside the checkout or ``$VITA_SHARED/fixtures``).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time

import numpy as np

from vita_jax import api, assets
from vita_jax import config as config_lib
from vita_jax.infer import compiles
from vita_jax.serve import engine as engine_lib
from vita_jax.serve import server as server_lib
from vita_jax.serve.session import TurnOptions

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHUNK = 1600  # 100 ms at 16 kHz


def default_fixtures() -> str:
    return os.path.join(os.environ.get("VITA_SHARED", os.path.join(os.path.dirname(REPO), "shared")), "fixtures")


def tiny_release(path: str, fixtures: str = None, seed: int = 3) -> str:
    """Writes the tiny chat-able release (random tiny VITA, full Qwen2.5 vocabulary and tokenizer,
    the fixtures' speech decoder + codec) to ``path``; returns it."""
    fixtures = fixtures or default_fixtures()
    tok = os.path.join(fixtures, "qwen2.5-tokenizer")
    if not os.path.isdir(tok):
        raise FileNotFoundError(f"{tok}: fixtures not found (give --fixtures or set VITA_SHARED)")
    c = config_lib.load_config("tiny")
    c.llm.vocab_size = 152064
    c.bos_token_id, c.eos_token_id = 151643, 151645
    api.init_model(c, seed=seed).save_pretrained(path)
    for f in os.listdir(tok):
        if f.endswith((".json", ".txt")) and "cases" not in f and "report" not in f:
            shutil.copy2(os.path.join(tok, f), path)
    for part in ("decoder", "codec"):  # the fixture's speech decoder fits a 64-wide LLM (16 x 4)
        shutil.copytree(os.path.join(fixtures, "vita15-tiny", "vita_tts_ckpt", part),
                        os.path.join(path, "vita_tts_ckpt", part))
    return path


def _client(url: str, wave: np.ndarray, turns: int, out: list, start: threading.Event) -> None:
    from websockets.sync.client import connect  # the serve extra: imported where the bench needs it
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
    onset = int(np.argmax(np.abs(wave) > 0.02)) // CHUNK  # the chunk where the speech begins
    silence = np.zeros(int(1.2 * 16000), "<i2")
    inbox: queue.Queue = queue.Queue()  # (receipt time, message): a reader thread stamps each one
    start.wait()
    with connect(url, max_size=None) as ws:
        def reader():
            with contextlib.suppress(Exception):
                for m in ws:
                    inbox.put((time.perf_counter(), m if isinstance(m, bytes) else json.loads(m)))

        def stream(samples):
            t_start = time.perf_counter()
            for k, i in enumerate(range(0, len(samples), CHUNK)):
                time.sleep(max(0.0, t_start + k * CHUNK / 16000 - time.perf_counter()))
                ws.send(samples[i:i + CHUNK].tobytes())
            return t_start
        threading.Thread(target=reader, daemon=True).start()
        for t in range(turns):
            barge = t == turns - 1
            stream(np.concatenate([pcm, silence]))
            rec, t_end, t_last_audio = dict(audio=0.0), None, None
            while True:
                at, m = inbox.get(timeout=600)
                if isinstance(m, bytes):
                    rec["audio"] += len(m) / 2 / 24000
                    t_last_audio = at
                elif m["type"] == "vad" and m["state"] == "speech_end":
                    t_end = at
                elif m["type"] == "response_text" and barge:  # interrupt with the next question
                    t0 = stream(pcm) + onset * CHUNK / 16000
                    stream(silence)
                    while True:  # stop_tts, unless the answer (and its playback) ended before the speech
                        at, m = inbox.get(timeout=600)
                        if isinstance(m, dict) and m["type"] == "stop_tts":
                            rec["barge_in_ms"] = 1000 * (at - t0)
                            break
                        if isinstance(m, dict) and m["type"] == "vad" and m["state"] == "speech_end":
                            break
                    break
                elif m["type"] == "error":  # a refused turn (no text yet) has no metrics; a failed speech
                    rec["type"] = "error"     # decoder is followed by them
                    if not rec.get("text"):
                        break
                elif m["type"] == "response_text":
                    rec["text"] = True
                elif m["type"] == "turn_metrics":
                    rec.update(m)
                    if t_end is not None and t_last_audio is not None and rec["audio"] > 0:
                        rec["rtf"] = (t_last_audio - t_end) / rec["audio"]
                    break
            out.append(rec)
            ws.send(json.dumps({"type": "reset"}))  # no history: every turn has the shapes the warm round compiled


def _speech_stats(engine, before) -> dict:
    """The speech engine's rows per dispatch over the measured turns."""
    sp = engine.speech
    if sp is None:
        return {}
    n = sp.dispatches - before[0]
    return dict(tts_rows_per_dispatch=round((sp.rows_dispatched - before[1]) / max(n, 1), 2), tts_dispatches=n)


def run(model, clients=(1, 2, 4, 8), turns: int = 3, max_new_tokens: int = 24, tts_max_tokens: int = 80) -> list:
    """One row of numbers per client count (see the module docstring)."""
    wave = assets.speech_clips()[0][1]
    rows = []
    for n in clients:
        engine = engine_lib.ServeEngine(model, slots=n, max_new_tokens=max_new_tokens, max_prompt=512,
                                        speech_max_tokens=tts_max_tokens)
        opts = TurnOptions(max_new_tokens=max_new_tokens, tts_max_tokens=tts_max_tokens)
        server_lib.warm_up(engine, opts, clip_seconds=[len(wave) / 16000 - d for d in (1.0, 0.5, 0.0)])
        out, start = [], threading.Event()
        with server_lib.in_thread(engine, max_sessions=n, opts=opts) as srv:
            warm = threading.Event()
            warm.set()  # one unmeasured client round first: the speech decoder's and codec's shapes compile
            _client(f"ws://127.0.0.1:{srv.port}/ws", wave, 2, [], warm)
            threads = [threading.Thread(target=_client, args=(f"ws://127.0.0.1:{srv.port}/ws", wave, turns, out,
                                                              start)) for _ in range(n)]
            for t in threads:
                t.start()
            s0 = dict(engine.stats)
            sp0 = (engine.speech.dispatches, engine.speech.rows_dispatched) if engine.speech else (0, 0)
            c0 = compiles.count()
            start.set()
            for t in threads:
                t.join()
            c1 = compiles.count()
        engine.close()
        done = [r for r in out if r.get("type") == "turn_metrics"]

        def pct(key, q):
            v = [r[key] for r in out if r.get(key) is not None]
            return None if not v else round(float(np.percentile(v, q)), 1)
        steps = engine.stats["steps"] - s0["steps"]
        rows.append(dict(clients=n, turns=len(done), failed=sum(r.get("type") == "error" for r in out),
                         first_text_p50_ms=pct("speech_end_to_first_text_ms", 50),
                         first_text_p95_ms=pct("speech_end_to_first_text_ms", 95),
                         first_audio_p50_ms=pct("speech_end_to_first_audio_ms", 50),
                         first_audio_p95_ms=pct("speech_end_to_first_audio_ms", 95),
                         barge_in_p50_ms=pct("barge_in_ms", 50), barge_in_p95_ms=pct("barge_in_ms", 95),
                         rtf_p50=None if pct("rtf", 50) is None else round(pct("rtf", 50), 2),
                         audio_s_per_turn=round(float(np.mean([r["audio"] for r in done])), 2) if done else None,
                         rows_per_step=round((engine.stats["row_steps"] - s0["row_steps"]) / max(steps, 1), 2),
                         **_speech_stats(engine, sp0), compiles_after_warmup=c1 - c0))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv) -> int:
    import argparse  # the bench's own options (python -m vita_jax.bench serve --help)

    import jax.numpy as jnp  # (as above)
    p = argparse.ArgumentParser(prog="python -m vita_jax.bench serve")
    p.add_argument("--checkpoint", help="release directory or vita_jax checkpoint (default: the tiny test model)")
    p.add_argument("--fixtures", default=None, help="fixtures folder for the tiny model")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--turns", type=int, default=3, help="turns per client (the last one is interrupted)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--tts-max-tokens", type=int, default=80, help="codec ids per text piece at most (40 / s)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = a.checkpoint or tiny_release(os.path.join(tmp, "tiny"), a.fixtures)
        model = api.from_pretrained(path, dtype=jnp.dtype(a.dtype))
        rows = run(model, [int(x) for x in a.clients.split(",")], a.turns, a.max_new_tokens, a.tts_max_tokens)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0
