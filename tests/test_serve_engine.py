"""The live server's turn engine without the network, on a random tiny VITA with the real Qwen2.5
tokenizer and the fixture's speech decoder: slot-batched decoding equals one-by-one generation,
joins and leaves do not recompile, text streams, speech starts at the first complete piece,
barge-in leaves no stale output, and a typed turn / a spoken turn end with turn_metrics."""
import threading
import time

import numpy as np
import pytest

import vita_jax
from vita_jax import assets
from vita_jax.infer import generate as gen
from vita_jax.serve import engine as engine_lib
from vita_jax.serve import session as session_lib

OPTS = session_lib.TurnOptions(max_new_tokens=6, tts_max_tokens=24, first=(8, 1.01), later=(8, 1.01), padding_size=2)


@pytest.fixture(scope="module")
def model(chat_release_dir):
    return vita_jax.from_pretrained(chat_release_dir)


@pytest.fixture(scope="module")
def engine(model):
    e = engine_lib.ServeEngine(model, slots=3, max_new_tokens=12, max_prompt=512)
    yield e
    e.close()


class Recorder:
    """A sink that keeps every item with the id of the turn it belongs to (None: not a turn's)."""

    def __init__(self):
        self.items, self.done = [], threading.Event()

    def __call__(self, item):
        self.items.append(item)
        if isinstance(item, dict) and item["type"] in ("turn_metrics", "error"):
            self.done.set()

    def kinds(self):
        return ["audio" if isinstance(i, bytes) else i["type"] + (":" + i["state"] if i["type"] == "vad" else "")
                for i in self.items]


def _wait(cond, timeout=600):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_slot_batched_decoding_equals_generate(model, engine):
    """Three turns, the second joining after the first's 3rd token and the third after the second's:
    every row decodes exactly as generate() alone, and no join or leave compiles anything new."""
    questions = ["Hello", "What is the weather like on Mars today?", "Hi"]
    prompts = [model.chat_inputs(q) for q in questions]
    want = []
    for ex in prompts:
        out = model.generate(ex["input_ids"][None], max_new_tokens=8)[0]
        want.append([int(t) for t in out if t >= 0 and t not in model.stop_ids])
    got, done = [[], [], []], [threading.Event() for _ in prompts]

    def request(i):
        def on_token(t):
            got[i].append(t)
            if len(got[i]) == 3 and i + 1 < len(prompts):
                engine.submit(request(i + 1))
        return engine_lib.Request(lambda: (prompts[i]["input_ids"], None, []), on_token,
                                  lambda reason, info: done[i].set(), max_new_tokens=8)
    engine.warmup(lambda: (prompts[0]["input_ids"], None, []))
    before = gen.decode_step._cache_size()
    steps0, rows0 = engine.stats["steps"], engine.stats["row_steps"]
    engine.submit(request(0))
    for d in done:
        assert d.wait(600)
    assert got == want
    assert gen.decode_step._cache_size() == before  # joins and leaves reuse the one compiled step
    assert engine.stats["row_steps"] - rows0 > engine.stats["steps"] - steps0  # rows shared steps
    assert engine.active == 0


def test_a_token_is_delivered_with_the_next_step_already_dispatched(model, engine):
    """The loop never waits on the host between steps: when decode step k's id reaches the turn, step k+1 is
    already dispatched (before: dispatched = k at that moment; the host's work then left the device idle)."""
    ex = model.chat_inputs("What is the weather like on Mars today?")
    engine.warmup(lambda: (ex["input_ids"], None, []))
    seen, done = [], threading.Event()
    steps0 = engine.stats["steps"]
    engine.submit(engine_lib.Request(lambda: (ex["input_ids"], None, []),
                                     lambda t: seen.append(engine.stats["steps"] - steps0),
                                     lambda reason, info: done.set(), max_new_tokens=6))
    assert done.wait(600)
    assert len(seen) >= 3, seen  # the prefill's id, then decode steps' ids
    assert seen[0] == 0 and all(d >= k + 1 for k, d in enumerate(seen[1:], start=1)), seen


def test_a_turns_text_is_made_off_the_engine_thread(engine, monkeypatch):
    """Detokenising, sending and cutting speech pieces run on the turn's text thread: the engine thread only queues
    the ids (before, every id was decoded and sent between two decode steps)."""
    tok = engine.model.tokenizer
    where, decode = [], tok.decode
    monkeypatch.setattr(tok, "decode", lambda *a, **k: (where.append(threading.current_thread().name),
                                                        decode(*a, **k))[1])
    rec = Recorder()
    s = session_lib.Session(engine, rec, OPTS)
    s.text("Tell me a story.")
    assert rec.done.wait(600) and rec.items[-1]["type"] == "turn_metrics", rec.kinds()
    assert where and all(n.startswith("vita-serve-text-") for n in where), sorted(set(where))
    _wait(lambda: not s.busy)


def test_a_turn_whose_end_fails_still_ends(engine, monkeypatch):
    """An error while a turn ends (here its final text) is logged and the turn ends all the same: the session is
    free for the next question (before, the failed end left it busy for good)."""
    rec = Recorder()
    s = session_lib.Session(engine, rec, OPTS)
    text_out = s._text_out

    def failing(turn, raw, final):
        if final:
            raise RuntimeError("the final text could not be sent")
        return text_out(turn, raw, final)
    monkeypatch.setattr(s, "_text_out", failing)
    s.text("Tell me a story.")
    _wait(lambda: s.turn is not None and s.turn.finished.is_set(), timeout=600)
    assert not s.busy and rec.kinds()[-1] == "turn_metrics"


def test_streaming_pieces_start_speech_before_the_reply_ends(engine):
    """Tokens of a known reply fed one by one: response_text streams, the speech thread starts at
    the first complete piece ('hello there.'), audio (even-length int16) follows, and the pieces
    equal the whole reply's split."""
    model = engine.model
    rec = Recorder()
    s = session_lib.Session(engine, rec, OPTS)
    turn = session_lib.Turn(s, "q", None, None, [], time.perf_counter())
    s.turn = turn
    ids = model.tokenizer.encode("☞Hello there, my friend. How are you today? Fine")
    started_at = None
    for k, t in enumerate(ids):
        s._on_token(turn, t)
        if turn.tts is not None and started_at is None:
            started_at = k
    assert started_at is not None and started_at < len(ids) - 3  # speech began while text was still coming
    s._on_llm_done(turn, "stop", dict(tokens=len(ids)))
    assert rec.done.wait(600)
    texts = [i for i in rec.items if isinstance(i, dict) and i["type"] == "response_text"]
    assert "".join(t["text"] for t in texts) == "Hello there, my friend. How are you today? Fine"
    assert texts[-1]["final"] and not any(t["final"] for t in texts[:-1])
    audio = [i for i in rec.items if isinstance(i, bytes)]
    assert audio and all(len(a) % 2 == 0 for a in audio)
    m = rec.items[-1]
    assert (m["type"] == "turn_metrics"
            and m["audio_seconds"] == pytest.approx(sum(len(a) for a in audio) / 2 / 24000, abs=1e-3))


def test_spoken_turn_end_to_end_then_history(engine):
    """Real speech with silence after it: VAD events, streamed text, audio, metrics; the second
    (typed) turn carries the first as history (two clips in its prompt)."""
    rec = Recorder()
    s = session_lib.Session(engine, rec, OPTS)
    wave = assets.speech_clips()[0][1]
    pcm = (np.concatenate([np.zeros(8000, np.float32), wave, np.zeros(16000, np.float32)]) * 32767).astype("<i2")
    for i in range(0, len(pcm), 3200):  # 200 ms chunks
        s.audio(pcm[i:i + 3200].tobytes())
    assert rec.done.wait(600)
    k = rec.kinds()
    assert k[:2] == ["vad:speech_start", "vad:speech_end"] and k[-1] == "turn_metrics"
    assert "response_text" in k
    m = rec.items[-1]
    for key in ("speech_end_to_first_text_ms", "speech_end_to_first_audio_ms", "audio_seconds"):
        assert key in m
    assert m["question_seconds"] > 1.0 and m["llm_tokens"] >= 1
    _wait(lambda: not s.busy)
    if s.history:  # a non-empty reply: the next prompt holds the previous clip too
        ids, _, clips = session_lib.Turn(s, "and then?", None, None, s.history, 0).prompt()
        assert len(clips) == 1 and (ids == -500).sum() == 1


def test_barge_in_cancels_without_stale_output(engine):
    """Speech during an answer: stop_tts at once, the engine frees the row between two steps, and
    nothing of the old answer (text or audio) is sent after stop_tts."""
    class Tagged(session_lib.Session):
        def _send(self, item, turn=None):
            ok = super()._send(item, turn)
            if ok:
                log.append((item, None if turn is None else turn.id))
            return ok
    log = []
    s = Tagged(engine, lambda item: None, session_lib.TurnOptions(max_new_tokens=12, tts_max_tokens=400,
                                                                   first=(8, 1.01), later=(8, 1.01), padding_size=2))
    s.text("Tell me a long story.")
    old = s.turn
    _wait(lambda: any(t == old.id for _, t in log))  # the answer is under way
    pcm = (assets.speech_clips()[0][1][:16000] * 32767).astype("<i2")
    s.audio(pcm.tobytes())
    assert old.cancelled.is_set()
    at = next(i for i, (item, _) in enumerate(log) if isinstance(item, dict) and item["type"] == "stop_tts")
    _wait(lambda: old.finished.is_set() and engine.active == 0)
    time.sleep(0.2)
    assert all(t != old.id for _, t in log[at:])
    assert log[at + 1][0] == {"type": "vad", "state": "speech_start"}
    assert old.llm_info.get("reason") in ("cancelled", "stop", "length")


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_concurrent_sessions_share_steps_and_bad_prompts_fail_alone(engine):
    recs = [Recorder() for _ in range(3)]
    sessions = [session_lib.Session(engine, r, OPTS) for r in recs]
    steps0, rows0 = engine.stats["steps"], engine.stats["row_steps"]
    with engine.cv:  # all three pending before the engine admits any (else a slow thread could see turn 1 end alone)
        for s, q in zip(sessions, ["One?", "Two?", "x " * 600]):  # the third prompt is over max_prompt
            s.text(q)
    for r in recs:
        assert r.done.wait(600)
    assert recs[2].items[-1]["type"] == "error" and "max_prompt" in recs[2].items[-1]["message"]
    assert all(r.items[-1]["type"] == "turn_metrics" for r in recs[:2])
    assert engine.stats["row_steps"] - rows0 > engine.stats["steps"] - steps0


def test_reply_splitter_streams_the_release_pieces():
    from vita_jax.infer.speech import ReplySplitter, split_reply
    text = "☞Hi, a. Hello there, my friend! 你好，世界。<unk>How are you?\nFine, thanks<|im_end|>"
    for size in (1, 2, 3, 7, len(text)):
        s = ReplySplitter()
        pieces = [p for i in range(0, len(text), size) for p in s.push(text[i:i + size])] + s.finish()
        assert pieces == split_reply(text)
    assert split_reply(text)[:2] == ["hi. a.", "hello there,"]


def test_incremental_detokenisation_equals_the_whole_decode(qwen_tokenizer):
    """The session decodes only the ids since its last complete text (not the whole reply per token): the
    streamed text equals one decode of all ids, with characters split over several byte tokens (CJK, emoji,
    accents) and spaces at the seams."""
    text = "Héllo wörld, 你好，世界！ 🎉🎉 done. ☞ x  y\nz"
    ids = qwen_tokenizer.encode(text)
    assert len(ids) > 10

    class Model:
        tokenizer, speech = qwen_tokenizer, None
    s = session_lib.Session.__new__(session_lib.Session)
    s.model, out = Model(), []
    s._send = lambda item, turn: out.append(item) or True
    turn = session_lib.Turn(s, "q", None, None, [], time.perf_counter())
    for t in ids:
        s._on_token(turn, t)
    assert turn.raw == qwen_tokenizer.decode(ids) == text
    assert "".join(m["text"] for m in out) == text.replace("☞", "")  # the state symbol is not shown


def _frame_b64(w=96, h=64):
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.arange(w * h * 3) % 251).astype(np.uint8).reshape(h, w, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow  # ~1 min on 2 cores: the server's warm-up, then six turns
def test_nothing_compiles_after_warm_up_for_any_clip_image_or_history(model):
    """After the server's warm-up (every prompt shape of the ladder, one typed and one spoken turn) a turn compiles
    nothing: spoken questions of 1 to 15 s, with the history of earlier spoken turns (their clips in the prompt),
    with a camera frame, and typed (turn_metrics.compiles counts XLA compilations while the turn runs)."""
    from vita_jax.serve import server as server_lib
    e = engine_lib.ServeEngine(model, slots=2, max_new_tokens=6, max_prompt=512)
    try:
        server_lib.warm_up(e, OPTS, clip_seconds=(2,))
        wave = np.concatenate([c[1] for c in assets.speech_clips()[:2]])
        rec = Recorder()
        s = session_lib.Session(e, rec, OPTS)
        got = []

        def turn(seconds=None, text=None):
            rec.done.clear()
            if text is not None:
                s.text(text)
            else:
                s._start(None, np.resize(wave, int(seconds * 16000)), time.perf_counter())
            assert rec.done.wait(600)
            m = rec.items[-1]
            assert m["type"] == "turn_metrics", m
            got.append((seconds, text, len(s.history), m["compiles"]))
            _wait(lambda: e.active == 0)

        turn(1.0)
        turn(3.7)  # the 1 s turn in the history: two clips in the prompt
        s.reset()
        s.video_frame(_frame_b64())
        turn(9.0)
        turn(text="And what did you see?")
        s.reset()
        turn(15.0)
        turn(6.3)
        assert [g[-1] for g in got] == [0] * len(got), got
        assert max(g[2] for g in got) >= 1  # turns did run with history
    finally:
        e.close()


def test_prompt_ladder_embeds_equal_prompt_embeds(model):
    """The server's prompt path (serve/prompt.py: towers per tile count / clip, splice per ladder length) gives the
    embeddings of ``prompt_embeds`` on every real position, zeros and a 0 mask on its padding; a prompt over
    ``max_prompt`` is refused naming it."""
    from PIL import Image

    from vita_jax.serve.prompt import PromptShapes
    wave = np.concatenate([c[1] for c in assets.speech_clips()[:2]])
    image = Image.fromarray((np.arange(80 * 120 * 3) % 251).astype(np.uint8).reshape(80, 120, 3))
    hist = [("user", "", (wave[:16000], 16000)), ("assistant", "Yes.")]
    ex = model.chat_inputs(hist + [("user", "And this?", (wave[:40000], 16000))], image=image)
    shapes = PromptShapes(model, max_prompt=512)
    got, mask = shapes.embeds(ex["input_ids"], ex["pixels"], ex["audio"])
    feats, lens = model.pad_clips(ex["audio"])
    want, want_mask = model.prompt_embeds(np.asarray(ex["input_ids"])[None], None, ex["pixels"], feats, lens)
    n = int(np.asarray(want_mask).sum())
    assert len(ex["audio"]) == 2 and ex["pixels"] is not None and got.shape[1] in shapes.lengths
    np.testing.assert_array_equal(np.asarray(mask)[0, :n], 1)
    np.testing.assert_array_equal(np.asarray(mask)[0, n:], 0)
    np.testing.assert_allclose(np.asarray(got)[0, :n], np.asarray(want)[0, :n], rtol=1e-5, atol=1e-5)
    assert not np.asarray(got)[0, n:].any()
    with pytest.raises(ValueError, match="max_prompt 128"):
        PromptShapes(model, max_prompt=100).embeds(ex["input_ids"], ex["pixels"], ex["audio"])
    # the tile ladder stops at what a prompt may hold (the server's --image-tiles), not at what max_prompt could
    one = PromptShapes(model, max_prompt=512, max_tiles=1)
    assert one.tiles == (1,) and shapes.tiles[-1] == 512 // model.tokens_per_tile
    with pytest.raises(ValueError, match=r"image tiles: \d+, over this server's largest 1"):
        one.embeds(ex["input_ids"], ex["pixels"], ex["audio"])


def test_close_ends_every_turn_still_waiting_for_preparation(model):
    """Turns queued behind the two preparation workers when the engine closes end as cancelled (their sessions would
    otherwise wait for them forever)."""
    e = engine_lib.ServeEngine(model, slots=1, max_new_tokens=2, max_prompt=128)
    gate, ended = threading.Event(), []
    ids = model.chat_inputs("Hi")["input_ids"]

    def build():
        gate.wait(600)  # both workers held here: the later requests stay queued
        return ids, None, []
    for i in range(4):
        e.submit(engine_lib.Request(build, lambda t: None, lambda reason, info, i=i: ended.append((i, reason)),
                                    max_new_tokens=2))
    threading.Timer(0.5, gate.set).start()
    e.close()
    assert sorted(ended) == [(i, "cancelled") for i in range(4)], ended
