"""``vita-jax serve`` over real sockets with a Python WebSocket client: the page, the protocol,
origin and size checks, malformed input, floods, abrupt disconnects and connect/disconnect cycles,
on a random tiny VITA with the real Qwen2.5 tokenizer and the fixture's speech decoder."""
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

websockets = pytest.importorskip("websockets")  # the serve extra
from websockets.sync.client import connect  # noqa: E402

import vita_jax  # noqa: E402
from vita_jax import assets  # noqa: E402
from vita_jax.serve import engine as engine_lib  # noqa: E402
from vita_jax.serve import server as server_lib  # noqa: E402
from vita_jax.serve.session import TurnOptions  # noqa: E402

from conftest import HANG_S

OPTS = TurnOptions(max_new_tokens=6, tts_max_tokens=24, first=(8, 1.01), later=(8, 1.01), padding_size=2)


@pytest.fixture(scope="module")
def server(chat_release_dir):
    model = vita_jax.from_pretrained(chat_release_dir)
    engine = engine_lib.ServeEngine(model, slots=2, max_new_tokens=6, max_prompt=512)
    with server_lib.in_thread(engine, max_sessions=2, opts=OPTS, max_message=200_000, rate_limit=100) as srv:
        yield srv
    engine.close()


def _url(srv, path="/ws"):
    return f"ws://127.0.0.1:{srv.port}{path}"


def _until(ws, kinds=("turn_metrics",), timeout=600):
    """Messages up to and including the first of ``kinds``: dicts, or ('audio', n_bytes)."""
    got, t0 = [], time.time()
    while time.time() - t0 < timeout:
        m = ws.recv(timeout=timeout)
        m = ("audio", len(m)) if isinstance(m, bytes) else json.loads(m)
        got.append(m)
        if isinstance(m, dict) and m["type"] in kinds:
            return got
    raise AssertionError(f"no {kinds} within {timeout} s: {got}")


def _wait(cond, timeout=600):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_page_and_static_files(server):
    base = f"http://127.0.0.1:{server.port}"
    page = urllib.request.urlopen(base + "/").read().decode()
    assert "<html" in page and "/ws" in page and "audioWorklet" in page
    js = urllib.request.urlopen(base + "/worklet.js")
    assert js.headers["Content-Type"].startswith("text/javascript") and b"registerProcessor" in js.read()
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(base + "/../setup.py")


def test_origin_check(server):
    with pytest.raises(websockets.exceptions.InvalidStatus, match="403"):
        connect(_url(server), origin="http://evil.example").close()
    with connect(_url(server), origin=f"http://localhost:{server.port}") as ws:
        ws.send(json.dumps({"type": "reset"}))
        ws.send(json.dumps({"type": "nope"}))
        assert json.loads(ws.recv(timeout=120))["type"] == "error"  # reset is silent, the unknown type is not


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_typed_and_spoken_turns(server):
    with connect(_url(server)) as ws:
        ws.send(json.dumps({"type": "text", "text": "Hello there, who are you?"}))
        msgs = _until(ws)
        kinds = [m["type"] if isinstance(m, dict) else m[0] for m in msgs]
        assert "response_text" in kinds and kinds[-1] == "turn_metrics"
        assert [m for m in msgs if isinstance(m, dict) and m["type"] == "response_text"][-1]["final"]
        m = msgs[-1]
        assert m["speech_end_to_first_text_ms"] > 0 and m["audio_seconds"] >= 0
        # the same turn again (no history): its shapes are warm, so nothing compiles (speech decoder included)
        ws.send(json.dumps({"type": "reset"}))
        ws.send(json.dumps({"type": "text", "text": "Hello there, who are you?"}))
        again = _until(ws)[-1]
        assert again["compiles"] == 0 and again["audio_seconds"] == m["audio_seconds"] > 0, (m, again)
        # a frame from the camera, then a spoken question (real speech, 100 ms chunks, then silence)
        ws.send(json.dumps({"type": "video_frame", "image": _png_b64()}))
        wave = np.concatenate([assets.speech_clips()[0][1], np.zeros(12000, np.float32)])
        pcm = (wave * 32767).astype("<i2").tobytes()
        for i in range(0, len(pcm), 3200):
            ws.send(pcm[i:i + 3200])
        msgs = _until(ws)
        kinds = [m["type"] if isinstance(m, dict) else m[0] for m in msgs]
        assert kinds.index("vad") < kinds.index("response_text") and msgs[-1]["question_seconds"] > 1
        assert all(m[1] % 2 == 0 for m in msgs if isinstance(m, tuple))  # whole int16 samples


def _png_b64():
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("frame, match", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "JSON object"),
    ("[" * 50000 + "]" * 50000, "nested too deeply"),
    (json.dumps({"type": 5}), "JSON object"),
    (json.dumps({"type": "dance"}), "unknown message type"),
    (json.dumps({"type": "text", "text": 7}), "non-empty string"),
    (json.dumps({"type": "video_frame", "image": ["x"]}), "base64 string"),
    (json.dumps({"type": "video_frame", "image": "!!notbase64"}), "not base64"),
    # a PNG header claiming 100000 x 100000 pixels (issue #24): an error message, not a closed connection
    (json.dumps({"type": "video_frame", "image": "iVBORw0KGgoAAAANSUhEUgABhqAAAYagCAIAAAAnMJyfAAAADElEQVR4nGNgoD0AAABk"
                                                  "AAGGZDw1AAAAAElFTkSuQmCC"}), "decompression-bomb limit"),
    (b"\x01\x02\x03", "even length"),
    (b"\x00" * 40000, "at most 32000"),
])
def test_bad_frames_get_an_error_and_the_session_goes_on(server, frame, match):
    with connect(_url(server)) as ws:
        ws.send(frame)
        m = json.loads(ws.recv(timeout=120))
        assert m["type"] == "error" and match in m["message"]
        ws.send(b"\x00\x00" * 1600)  # still served: silence is accepted without a reply
        ws.send(json.dumps({"type": "dance"}))
        assert json.loads(ws.recv(timeout=120))["type"] == "error"


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_oversized_message_and_flood_close_only_that_connection(server):
    with connect(_url(server)) as other:
        with connect(_url(server), max_size=None) as ws:
            ws.send(json.dumps({"type": "text", "text": "x" * 300_000}))  # over max_message
            with pytest.raises(websockets.exceptions.ConnectionClosed) as e:
                ws.recv(timeout=120)
            assert e.value.rcvd.code == 1009
        with connect(_url(server)) as ws:
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                for _ in range(1000):
                    ws.send(json.dumps({"type": "reset"}))
                while True:
                    m = json.loads(ws.recv(timeout=120))
                    assert m["type"] == "error" and "too many" in m["message"]
        other.send(json.dumps({"type": "text", "text": "Still there?"}))
        assert _until(other)[-1]["type"] == "turn_metrics"


def _threads():
    """Live threads other than the engine's preparation pool (its two workers start on first use and stay)."""
    return sum(not t.name.startswith("vita-serve-prep") for t in threading.enumerate())


@pytest.mark.slow  # ~10 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_busy_disconnect_mid_answer_and_cycles_leak_nothing(server):
    threads = _threads()
    with connect(_url(server)) as a, connect(_url(server)) as b:
        with connect(_url(server)) as c:
            assert json.loads(c.recv(timeout=120)) == {"type": "busy"}
        a.send(json.dumps({"type": "text", "text": "Tell me a story."}))
        b.send(json.dumps({"type": "text", "text": "And you?"}))
        a.recv(timeout=600)  # the answer has begun; `a` goes away without a close
        a.socket.close()
        assert _until(b)[-1]["type"] == "turn_metrics"
    _wait(lambda: not server.sessions and server.engine.active == 0)
    for _ in range(50):
        with connect(_url(server)) as ws:
            ws.send(b"\x00\x00" * 800)
    _wait(lambda: not server.sessions)
    _wait(lambda: _threads() <= threads + 1)
    assert server.engine.active == 0 and not server.engine.pending


def test_stop_waits_for_the_speech_of_an_open_answer(server, monkeypatch):
    """Stopping a server while a turn's speech thread is inside a codec decode (made to take 2 s) returns only after
    that thread ended: one still in an XLA call when the interpreter exits aborts the process (`bench serve` ended
    with exit 134)."""
    speech, entered = server.engine.model.speech, threading.Event()
    decode = speech.codes_to_wave
    monkeypatch.setattr(speech, "codes_to_wave", lambda *a, **k: (entered.set(), time.sleep(2.0), decode(*a, **k))[2])

    def speaking():
        return [t for t in threading.enumerate() if t.name.startswith("vita-serve-tts-") and t.is_alive()]
    with server_lib.in_thread(server.engine, max_sessions=1, opts=OPTS) as srv:
        with connect(_url(srv)) as ws:
            ws.send(json.dumps({"type": "text", "text": "Tell me a story."}))
            assert entered.wait(600)
            assert speaking()
    assert not speaking()


def test_serving_imports_no_torch():
    code = ("import sys, numpy as np; import vita_jax.serve.server; from vita_jax.infer import vad; "
            "v = vad.SileroVAD(); v(np.zeros(512, np.float32)); assert 'torch' not in sys.modules, 'torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr[-2000:]


def test_cli_serve_user_errors(capsys):
    from vita_jax import cli
    assert cli.main(["serve", "--checkpoint", "/nonexistent/vita", "--no-warmup"]) == 2
    assert "vita-jax: error:" in capsys.readouterr().err
    assert cli.main(["serve", "--checkpoint", "/nonexistent/vita", "--max-sessions", "0"]) == 2
    assert "--max-sessions" in capsys.readouterr().err
