"""TiCodec decode / encode, official streaming, speech checkpoints round trip, speak()."""
import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import vita_jax
from vita_jax.infer.speech import FifoLock, find_min_sum_index, load_speech

from conftest import tts_ref


def test_codec_decode(speech, tts_dir):
    r = tts_ref(tts_dir, "codec_decode")
    wav = speech.codes_to_wave(r["codes"], r["global_tokens"])
    assert wav.shape == (30000,) and speech.sample_rate == 24000
    assert np.abs(wav - r["wav"].ravel()).max() <= 1e-4 * np.abs(r["wav"]).max()
    # the config's global tokens are the fixture's (the release's fixed voice)
    np.testing.assert_array_equal(speech.codes_to_wave(r["codes"]), wav)


def test_codec_encode(speech, tts_dir):
    r = tts_ref(tts_dir, "codec_encode")
    codes, gt = speech.wave_to_codes(r["wav"])
    np.testing.assert_array_equal(codes, r["codes"].ravel())   # 95,643 samples -> 159 frames (floors)
    np.testing.assert_array_equal(gt, r["global_tokens"].ravel())


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_streaming_equals_official(speech, tts_dir):
    st = tts_ref(tts_dir, "streaming")
    with open(os.path.join(tts_dir, "reference/cases.json")) as f:
        meta = json.load(f)["cases"]["streaming"]["meta"]
    for case in ("s_mid", "s_never", "s_always", "s_server_first"):
        m = meta[case]
        segs = list(speech.stream(st["codes"][0], chunk_size=m["codec_chunk_size"],
                                  padding_size=m["codec_padding_size"],
                                  seg_threshold=m["seg_threshold"], global_tokens=st["global_tokens"]))
        assert [len(s) for s in segs] == st[case + "_seg_lens"].tolist(), case
        ref = st[m["wav"]].ravel()
        assert np.abs(np.concatenate(segs) - ref).max() <= 1e-4 * np.abs(ref).max(), case
    segs = list(speech.stream(st["hidden"], chunk_size=8, padding_size=2, seg_threshold=1.01, top_k=1))
    assert [len(s) for s in segs] == st["s_e2e_seg_lens"].tolist()
    assert np.abs(np.concatenate(segs) - st["e2e_wav"].ravel()).max() <= 1e-4 * np.abs(st["e2e_wav"]).max()


def test_cut_search_doubled_offset():
    a = np.ones(5000, np.float32)
    a[3000:3100] = 0.0          # quiet stretch in the second half
    buf, out = find_min_sum_index(np.zeros(0, np.float32), a[None, None], 2401, 10.0)
    assert out is not None and len(out) + len(buf) == 5000
    buf2, out2 = find_min_sum_index(np.zeros(3, np.float32), a[None, None], 2401, 0.0)
    assert out2 is None and len(buf2) == 5003


def _flat(x, p=""):
    out = {}
    for k, v in x.items():
        out.update(_flat(v, p + k + "/") if isinstance(v, dict) else {p + k: v})
    return out


def test_speech_checkpoints_round_trip(speech, tts_dir, tmp_path):
    speech.save(str(tmp_path / "tts"))
    for part in ("decoder", "codec"):
        a = _flat(torch.load(os.path.join(tts_dir, part, "final.pt"), weights_only=True))
        b = _flat(torch.load(str(tmp_path / "tts" / part / "final.pt"), weights_only=True))
        assert set(a) == set(b), part
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        with open(os.path.join(tts_dir, part, "model.json")) as f1, open(tmp_path / "tts" / part / "model.json") as f2:
            assert json.load(f1) == json.load(f2)
    again = load_speech(str(tmp_path / "tts"))
    g = tts_ref(tts_dir, "decoder_infer_greedy")
    np.testing.assert_array_equal(again.generate_codes(g["hidden"], top_k=1, max_tokens=40), g["tokens"])


class _Tok:
    """A stand-in tokenizer for the fixture's synthetic 512-id vocabulary."""

    def encode(self, text):
        return [30 + (ord(ch) % 400) for ch in text]


def test_speak(tiny_dir):
    m = vita_jax.from_pretrained(tiny_dir)
    assert m.speech is not None
    m.tokenizer = _Tok()
    x = m.speech_input("☞hi")
    table = np.asarray(m.params["llm"]["model"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(x, table[[30 + ord("h") % 400, 30 + ord("i") % 400]].reshape(-1, 16))
    wav = m.speak("hello there", top_k=1, max_tokens=30, first=(8, 1.01), padding_size=2)
    assert wav.dtype == np.float32 and 0 < len(wav) <= 30 * 600 and np.isfinite(wav).all()
    assert m.speak("") .shape == (0,)
    assert m.speak("☜") .shape == (0,)
    # a special id drawn mid-reply (BOS / SOS / PAD: the release's codec would crash on it) is skipped
    odim, plain = m.speech.decoder_cfg.odim, m.speech.iter_codes

    def with_specials(*a, **k):
        for i, tok in enumerate(plain(*a, **k)):
            if i in (3, 11):
                yield odim if i == 3 else odim + 3
            yield tok
    m.speech.iter_codes = with_specials
    np.testing.assert_array_equal(m.speak("hello there", top_k=1, max_tokens=30, first=(8, 1.01), padding_size=2), wav)


@pytest.mark.slow  # ~10 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_stream_skips_special_ids(speech, tts_dir):
    """``stream`` drops the decoder's special ids (they carry no sound) and goes on; another id
    outside the codebook is an error."""
    codes = tts_ref(tts_dir, "streaming")["codes"][0][:50].tolist()
    odim = speech.decoder_cfg.odim
    noisy = codes[:5] + [odim] + codes[5:20] + [odim + 1, odim + 3] + codes[20:] + [odim + 2]
    kw = dict(chunk_size=8, padding_size=2, seg_threshold=1.01)
    want, got = list(speech.stream(np.asarray(codes), **kw)), list(speech.stream(np.asarray(noisy), **kw))
    assert [len(s) for s in got] == [len(s) for s in want]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))
    with pytest.raises(ValueError, match="codec ids must be in"):
        list(speech.stream(np.asarray(codes[:3] + [odim + 4]), **kw))


def test_reply_pieces():
    from vita_jax.infer.speech import split_reply, trim_leading
    assert split_reply("☞Hello, world. How are you? Fine") == ["hello.", "world.", "how are you?", "fine"]
    assert split_reply("Hi, a. ok") == ["hi. a.", "ok"]
    assert split_reply("☜") == []
    np.testing.assert_array_equal(trim_leading(np.array([0.0, 0.01, 0.5, 0.0], np.float32)), [0.5, 0.0])


def _queued(lock, tickets):
    """Waits until ``tickets`` tickets of the FifoLock ``lock`` are taken (threads queued behind its holder)."""
    deadline = time.time() + 30
    while lock._next < tickets and time.time() < deadline:
        time.sleep(0.001)
    assert lock._next >= tickets


def test_codec_decodes_are_granted_in_the_order_asked(speech):
    """The live server's turns share the codec in turn order (FifoLock), and a decode made while others wait for
    the codec is the same waveform as alone."""
    lock, order, threads = FifoLock(), [], []
    lock.__enter__()  # held: every thread below queues, in the order started
    for k in range(5):
        t = threading.Thread(target=lambda k=k: (lock.__enter__(), order.append(k), lock.__exit__()))
        t.start()
        threads.append(t)
        _queued(lock, k + 2)  # k + 1 tickets taken besides the holder's
    time.sleep(0.05)
    assert order == []  # nobody got in while it was held
    lock.__exit__()
    for t in threads:
        t.join(30)
    assert order == [0, 1, 2, 3, 4]
    codes = np.arange(12) % speech.codec_cfg.n_codes
    alone = speech.codes_to_wave(codes)
    outs = [None] * 3
    workers = [threading.Thread(target=lambda i=i: outs.__setitem__(i, speech.codes_to_wave(codes))) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(o is not None and np.array_equal(o, alone) for o in outs)


def test_a_turn_cancelled_while_queued_for_the_codec_gives_it_up(speech):
    """Barge-in while a turn waits for the codec (another turn's decode holds it): once granted, the cancelled turn
    decodes nothing and its stream ends, so the next turn gets the codec at once; an uncancelled call decodes."""
    codes = np.arange(12) % speech.codec_cfg.n_codes
    lock, out, stop = speech._codec_turns, [], threading.Event()
    for call in (lambda: speech.codes_to_wave(codes, stop=stop.is_set),
                 lambda: list(speech.stream(np.arange(40) % speech.codec_cfg.n_codes, chunk_size=20,
                                            stop=stop.is_set))):
        stop.clear()
        lock.__enter__()  # another turn's decode
        t = threading.Thread(target=lambda call=call: out.append(call()))
        t.start()
        _queued(lock, lock._serving + 2)
        stop.set()
        lock.__exit__()
        t.join(60)
    assert out == [None, []]
    np.testing.assert_array_equal(speech.codes_to_wave(codes, stop=lambda: False), speech.codes_to_wave(codes))
