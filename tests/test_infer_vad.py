"""Silero VAD in numpy against the silero-vad wheel's own TorchScript model, on real speech."""
import numpy as np
import pytest

from vita_jax import assets
from vita_jax.infer import vad

silero_vad = pytest.importorskip("silero_vad")  # the serve extra
torch = pytest.importorskip("torch")            # the reference only (the torch extra)

TOL = 1e-5  # measured: 1.6e-6 max |p - p_ref| over both ARCTIC clips and the dialogue stream


def _stream():
    """Two real utterances with 1.2 s of low noise before, between and after: a dialogue."""
    clips = [w for _, w, _ in assets.speech_clips()[:2]]
    gap = (np.random.default_rng(0).standard_normal(19200) * 1e-3).astype(np.float32)
    return np.concatenate([gap, clips[0], gap, clips[1], gap])


@pytest.fixture(scope="module")
def reference():
    return silero_vad.load_silero_vad()  # TorchScript, what the wheel's users run


def _ref_probs(model, wave):
    model.reset_states()
    x = np.pad(wave, (0, -len(wave) % vad.WINDOW))
    with torch.no_grad():
        return np.asarray([model(torch.from_numpy(x[i:i + vad.WINDOW]), 16000).item()
                           for i in range(0, len(x), vad.WINDOW)])


def test_probabilities_match_the_wheels_model(reference):
    ours = vad.SileroVAD()
    wave = _stream()
    ref = _ref_probs(reference, wave)
    got = ours.probs(wave)
    assert np.abs(got - ref).max() < TOL
    assert ref.max() > 0.99 and ref.min() < 0.05  # speech and silence both present


def test_segmenter_matches_vad_iterator(reference):
    """The streaming decisions are the wheel's VADIterator at the official settings, fed in odd-sized chunks."""
    wave = _stream()
    it = silero_vad.VADIterator(reference, threshold=0.7, min_silence_duration_ms=500, speech_pad_ms=30)
    x = np.pad(wave, (0, -len(wave) % vad.WINDOW))
    ref = []
    for i in range(0, len(x), vad.WINDOW):
        ev = it(torch.from_numpy(x[i:i + vad.WINDOW]))
        if ev:
            ref.append(("speech_start", i) if "start" in ev else ("speech_end", i, ev["end"]))
    seg = vad.Segmenter(vad.VADConfig(min_speech_ms=0))
    got, fed = [], 0
    rng = np.random.default_rng(1)
    while fed < len(x):
        n = int(rng.integers(1, 16000))
        for kind, s, end in seg.feed(x[fed:fed + n]):
            at = end - vad.WINDOW  # the first sample of the window that decided it
            got.append((kind, at) if kind == "speech_start" else (kind, at, len(s)))
        fed += n
    assert [g[:2] for g in got] == [r[:2] for r in ref] and len(ref) == 4
    # segment length: from pad before the start window to the iterator's end sample
    starts = [r[1] for r in ref if r[0] == "speech_start"]
    ends = [r[2] for r in ref if r[0] == "speech_end"]
    assert [g[2] for g in got if g[0] == "speech_end"] == [e - (s - 480) for s, e in zip(starts, ends)]


def test_short_segments_are_not_questions():
    seg = vad.Segmenter(vad.VADConfig(min_speech_ms=1000))
    word = [w for n, w, _ in assets.speech_clips() if len(w) < 16000][0]  # a sub-second real snippet
    quiet = np.zeros(16000, np.float32)
    events = seg.feed(np.concatenate([quiet, word, quiet]))
    assert [k for k, *_ in events] == ["speech_start", "speech_end"] and events[1][1] is None
    events = seg.feed(np.concatenate([assets.speech_clips()[0][1], quiet]))
    assert events[-1][0] == "speech_end" and len(events[-1][1]) > 16000


def test_bad_settings_and_windows_are_refused():
    with pytest.raises(ValueError, match="thresholds"):
        vad.VADConfig(start=0.5, end=0.6)
    with pytest.raises(ValueError, match="512"):
        vad.SileroVAD()(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="initializers missing"):
        import onnx  # noqa: F401 (the error path parses a real but different ONNX file)
        from onnx import TensorProto, helper
        g = helper.make_graph([], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        path = "/tmp/_not_vad.onnx"
        onnx.save(helper.make_model(g), path)
        vad.load_weights(path)
