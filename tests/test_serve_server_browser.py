"""The page in a real headless Chromium, end to end: it connects, streams a speech file from the fake
microphone through its AudioWorklet, shows the answer text and plays the answer audio. The
screenshot is kept (``$VITA_TEST_ARTIFACTS/serve_page.png``, else pytest's tmp dir). Chromium is
driven over the DevTools protocol with the ``websockets`` client (no browser download, no driver)."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

websockets = pytest.importorskip("websockets")  # the serve extra
from websockets.sync.client import connect  # noqa: E402

import vita_jax  # noqa: E402
from vita_jax import assets  # noqa: E402
from vita_jax.serve import engine as engine_lib  # noqa: E402
from vita_jax.serve import server as server_lib  # noqa: E402
from vita_jax.serve.session import TurnOptions  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,  # minutes: outside the quick loop (pytest -m "not slow")
              pytest.mark.skipif(CHROMIUM is None,
                                 reason="no chromium on PATH (.ci/run installs it: apt-get install chromium)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         "--autoplay-policy=no-user-gesture-required", "--window-size=1100,760", "--remote-debugging-port=0"]


@pytest.fixture(scope="module")
def server(chat_release_dir):
    model = vita_jax.from_pretrained(chat_release_dir)
    engine = engine_lib.ServeEngine(model, slots=1, max_new_tokens=8, max_prompt=512)
    opts = TurnOptions(max_new_tokens=8, tts_max_tokens=40, first=(8, 1.01), later=(8, 1.01), padding_size=2)
    # compiled before the page connects: the looped microphone file leaves 300 s of silence for both turns,
    # which must not depend on how fast this machine compiles
    server_lib.warm_up(engine, opts, clip_seconds=(4,))
    with server_lib.in_thread(engine, max_sessions=1, opts=opts) as srv:
        yield srv
    engine.close()


class DevTools:
    """The smallest DevTools-protocol client: ``call(method, **params)`` -> result."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv(timeout=60))
            if m.get("id") == self.n:
                assert "error" not in m, m
                return m["result"]

    def stats(self):
        r = self.call("Runtime.evaluate", expression="JSON.stringify(window.vitaStats || null)", returnByValue=True)
        return json.loads(r["result"]["value"])


def _page_target(profile, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = os.path.join(profile, "DevToolsActivePort")
        if os.path.exists(path) and open(path).read().strip():
            port = int(open(path).read().split()[0])
            pages = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
                     if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.2)
    raise AssertionError("chromium did not start its DevTools endpoint")


def _poll(cdp, cond, timeout=600):
    t0, s = time.time(), None
    while time.time() - t0 < timeout:
        s = cdp.stats()
        if s and cond(s):
            return s
        time.sleep(0.5)
    raise AssertionError(f"the page did not reach the expected state within {timeout} s: {s}")


def test_page_end_to_end_in_chromium(server, tmp_path):
    wav = tmp_path / "question.wav"  # what the fake microphone plays (looped): silence, real speech, silence
    sr = 16000
    speech = assets.speech_clips()[0][1]
    sf.write(wav, np.concatenate([np.zeros(sr // 2), speech, np.zeros(300 * sr)]).astype(np.float32), sr,
             subtype="PCM_16")
    out_dir = os.environ.get("VITA_TEST_ARTIFACTS") or str(tmp_path)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                 f"--use-file-for-fake-audio-capture={wav}",
                                 f"http://127.0.0.1:{server.port}/?autostart=1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with connect(_page_target(profile), max_size=None) as ws:
                cdp = DevTools(ws)
                s = _poll(cdp, lambda s: s["metrics"])  # the spoken question answered
                # then, without history, a typed one through the page's form (the random tiny model's
                # answer to it is known to be long enough to speak; the fake microphone is silent meanwhile)
                cdp.call("Runtime.evaluate",
                         expression="ws.send(JSON.stringify({type: 'reset'}));"
                                    "document.getElementById('q').value = 'Hello there, who are you?';"
                                    "document.getElementById('ask').requestSubmit()")
                s = _poll(cdp, lambda s: len(s["metrics"]) >= 2 and s["audioChunks"] > 0)
                time.sleep(1.0)  # let the page render the metrics line
                png = cdp.call("Page.captureScreenshot", format="png")["data"]
                shot = os.path.join(out_dir, "serve_page.png")
                with open(shot, "wb") as fh:
                    fh.write(base64.b64decode(png))
                print("screenshot:", shot, "stats:", {k: v for k, v in s.items() if k != "metrics"})
                log_text = cdp.call("Runtime.evaluate", expression="document.getElementById('log').innerText",
                                    returnByValue=True)["result"]["value"]
        finally:
            proc.terminate()
            proc.wait(30)
    assert s["connected"] and s["sentAudioBytes"] > 32000 and s["frames"] >= 1  # mic through the worklet, camera
    assert "speech_start" in s["vad"] and "speech_end" in s["vad"]
    assert s["texts"] > 0 and s["audioChunks"] > 0 and s["audioSeconds"] > 0, s
    m = s["metrics"][0]
    assert m["speech_end_to_first_text_ms"] > 0 and m["question_seconds"] > 1.0
    assert s["metrics"][1]["audio_seconds"] > 0 and s["metrics"][1]["speech_end_to_first_audio_ms"] > 0
    assert "first text" in log_text and os.path.getsize(shot) > 10_000
