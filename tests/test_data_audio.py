"""Speech input against the official fixture: Kaldi fbank, CMVN, whale encoder, adapter; audio length checked on
the header, bad files and sample rates refused in one line naming the file."""
import io
import os

import jax
import numpy as np
import pytest
import soundfile as sf

from vita_jax import cli
from vita_jax import config as config_lib
from vita_jax.convert import release
from vita_jax.data import audio as A
from vita_jax.data.batch import Preprocess, preprocess_settings
from vita_jax.models import whale as W

from conftest import one_line, rel_err


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return np.load(os.path.join(tiny_dir, "reference/audio.npz"))


def _fbank_close(got, want):
    assert got.shape == want.shape
    d = np.abs(got - want)
    assert d.max() <= 1e-3 and d.mean() <= 1e-5, (d.max(), d.mean())


@pytest.mark.parametrize("clip", [0, 1])
def test_fbank_equals_official(model, ref, tiny_dir, clip):
    _fbank_close(model.audio_features(ref[f"clip{clip}_wave_int16"], 16000), ref[f"clip{clip}_fbank"])
    from_file = model.audio_features(os.path.join(tiny_dir, f"reference/clip{clip}.wav"))
    _fbank_close(from_file, ref[f"clip{clip}_fbank"])
    assert A.llm_length(from_file.shape[0]) == ref[f"clip{clip}_lengths_for_llm"]


def test_fbank_full_recording_and_cmvn(model, tiny_dir, ref):
    full = np.load(os.path.join(tiny_dir, "reference/fbank_full.npz"))
    f = model.audio_features(full["wave_int16"].astype(np.float32) / 32768.0, 16000)  # float input path
    _fbank_close(f, full["fbank"])
    assert A.llm_length(len(f)) == full["lengths_for_llm"]
    mean, istd = release.read_cmvn(os.path.join(tiny_dir, "audio-encoder-tiny-whale/global_cmvn"))
    enc = model.params["audio_encoder"]["encoder"]
    np.testing.assert_array_equal(np.asarray(enc["cmvn_mean"]), mean)  # shard buffers = the JSON stats
    np.testing.assert_array_equal(np.asarray(enc["cmvn_istd"]), istd)
    ours = [(model.audio_features(ref[f"clip{k}_wave_int16"], 16000) - mean) * istd for k in (0, 1)]
    for k in (0, 1):
        n = ours[k].shape[0]
        d = np.abs(ours[k] - ref["batch_cmvn"][k, :n])
        assert d.max() <= 1e-3 and d.mean() <= 1e-5


def test_encoder_intermediates_batch(model, ref):
    m = W.WhaleAudioEncoder(model.whale_cfg, keep_hidden=True)
    out = jax.jit(lambda p, f, l: m.apply({"params": p}, f, l))(model.params["audio_encoder"], ref["batch_fbank"],
                                                               ref["batch_lengths"])
    lens = ref["batch_encoder_lengths"]
    enc_mask = np.asarray(out["encoder_mask"])
    np.testing.assert_array_equal(enc_mask, ref["batch_encoder_mask"][:, 0])
    np.testing.assert_array_equal(enc_mask.sum(-1), lens)
    np.testing.assert_array_equal(np.asarray(out["mask"]), ref["batch_adapter_mask"])
    assert rel_err(out["pos_emb"], ref["batch_pos_emb"][0]) <= 1e-5
    for b in range(2):  # real frames of each clip
        t, t2 = lens[b], ref["batch_adapter_lengths"][b]
        assert rel_err(out["subsampling_out"][b, :t], ref["batch_subsampling_out"][b, :t]) <= 1e-5
        assert rel_err(out["embed_out"][b, :t], ref["batch_embed_out"][b, :t]) <= 1e-5
        assert rel_err(out["block_outs"][:, b, :t], ref["batch_block_outs"][:, b, :t]) <= 1e-5
        assert rel_err(out["encoder_out"][b, :t], ref["batch_encoder_out"][b, :t]) <= 1e-5
        conv = np.asarray(out["adapter_conv_out"]).transpose(0, 2, 1)
        assert rel_err(conv[b, :, :t2], ref["batch_adapter_conv_out"][b, :, :t2]) <= 1e-5
        assert rel_err(out["embeds"][b, :t2], ref["batch_adapter_out"][b, :t2]) <= 1e-5


@pytest.mark.parametrize("clip", [0, 1])
def test_single_clip(model, ref, clip):
    fb = ref[f"clip{clip}_fbank"]
    out = W.WhaleAudioEncoder(model.whale_cfg).apply({"params": model.params["audio_encoder"]}, fb[None],
                                                    np.array([len(fb)]))
    assert rel_err(out["encoder_out"], ref[f"single{clip}_encoder_out"]) <= 1e-5
    assert rel_err(out["embeds"], ref[f"single{clip}_adapter_out"]) <= 1e-5


def test_encode_audio_entry_point(model, ref):
    emb, n = model.encode_audio(ref["batch_fbank"], ref["batch_lengths"])
    np.testing.assert_array_equal(n, ref["batch_lengths_for_llm"])
    assert emb.shape == (2, 18, 64) and emb.dtype == np.float32
    for b in range(2):
        assert rel_err(emb[b, :n[b]], ref["batch_adapter_out"][b, :n[b]]) <= 1e-5
    one, n1 = model.encode_audio(ref["clip1_fbank"][None], [88])
    assert n1.tolist() == [11] and rel_err(one[0], ref["single1_adapter_out"][0]) <= 1e-5


def test_bad_audio_errors(model, tmp_path):
    with pytest.raises(A.AudioError, match="empty"):
        model.audio_features(np.zeros(0, np.float32), 16000)
    with pytest.raises(A.AudioError, match="shorter than the speech encoder's shortest input of 7 frames"):
        model.audio_features(np.zeros(399, np.float32), 16000)  # (checked before the fbank's one-window minimum)
    with pytest.raises(A.AudioError, match="shorter than one"):
        A.audio_features(np.zeros(399, np.float32), 16000)  # the plain feature function keeps no encoder minimum
    with pytest.raises(A.AudioError, match="NaN"):
        model.audio_features(np.array([0.1, np.nan] * 800, np.float32), 16000)
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage" * 3)
    with pytest.raises(A.AudioError, match="noise.wav"):
        model.audio_features(str(bad))
    with pytest.raises(A.AudioError, match="nothere.flac"):
        model.audio_features(str(tmp_path / "nothere.flac"))
    too_long = 4 * model.whale_cfg.max_positions + 10
    with pytest.raises(ValueError, match="position table"):
        model.encode_audio(np.zeros((1, too_long, 80), np.float32), [too_long])


def test_stereo_and_48k_converted(model, ref, tmp_path):
    mono = ref["clip0_wave_int16"]
    stereo = np.stack([mono, mono], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 16000, subtype="PCM_16")
    _fbank_close(model.audio_features(str(path)), ref["clip0_fbank"])
    import librosa
    up = librosa.resample(mono.astype(np.float32) / 32768, orig_sr=16000, target_sr=48000)
    p48 = tmp_path / "clip48k.wav"
    sf.write(p48, np.stack([up, up], 1), 48000, subtype="FLOAT")
    f48 = model.audio_features(str(p48))
    assert f48.shape == ref["clip0_fbank"].shape
    assert np.abs(f48 - ref["clip0_fbank"]).mean() < 0.2  # resampled twice: close, not identical


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_other_rates_resampled(model, ref, rate):
    import librosa
    wav = librosa.resample(ref["clip0_wave_int16"].astype(np.float32) / 32768, orig_sr=16000, target_sr=rate)
    f = model.audio_features(wav, rate)
    assert f.shape == ref["clip0_fbank"].shape and np.isfinite(f).all()


def test_static_chunk_mask():
    m = W.chunk_mask(6, 2, 1)
    expected = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(m, expected)
    assert W.chunk_mask(5, 2, -1)[4].all() and not W.chunk_mask(5, 2, -1)[0, 2:].any()


def test_train_yaml(tiny_dir, tmp_path):
    y = release.read_train_yaml(os.path.join(tiny_dir, "audio-encoder-tiny-whale/train.yaml"))
    assert ((y["attention_dim"], y["attention_heads"], y["num_blocks"], y["linear_units"], y["kernel_size"],
             y["llm_embed_dim"], y["activation"], y["chunk_size"], y["dynamic_chunks"])
            == (32, 4, 2, 64, 5, 64, "gelu", -1, False))
    bad = tmp_path / "train.yaml"
    bad.write_text(open(os.path.join(tiny_dir, "audio-encoder-tiny-whale/train.yaml")).read()
                   .replace("transformer-chunk_size: -1", "transformer-chunk_size: 0"))
    with pytest.raises(ValueError, match="chunk_size 0"):
        release.read_train_yaml(str(bad))


# ---------------------------------------------------------- refused early, one line naming the file, field or option


@pytest.mark.parametrize("rate", [0, -16000, float("nan"), "16k", True])
def test_waveform_rate_is_checked(rate):
    from vita_jax.data import audio
    with pytest.raises(audio.AudioError, match="<waveform>: sample_rate .* must be a positive number"):
        audio.audio_features(np.zeros(16000, np.float32), rate)


# ------------------------------------------------------------------ media that cannot work: one line naming the file


def test_audio_length_checked_on_the_header(tmp_path, monkeypatch):
    """A clip over the encoder's limit is refused naming the file and both lengths, never decoded."""
    path = tmp_path / "talk.flac"
    sf.write(path, np.zeros(3 * 22050, np.float32), 22050)  # 3 s at 22.05 kHz = 298 frames at 16 kHz
    assert A.fbank_frames_for(3 * 22050, 22050) == A.num_frames(48000) == 298

    def no_decoding(*a, **k):
        raise AssertionError("decoded")
    monkeypatch.setattr(A.sf, "read", no_decoding)
    c = config_lib.load_config("tiny")
    c.audio.max_positions = 50  # the encoder's position table: 4 x 50 + 3 = 203 fbank frames
    prep = preprocess_settings(c)
    assert prep.max_audio_frames == 203 and Preprocess().max_audio_frames == 20003  # VITA-1.5: 5000 rows, ~200 s
    with pytest.raises(A.AudioError) as e:
        prep.fbank(str(path))
    one_line(e, "talk.flac", "3.0 s", "298 fbank frames", "203 frames", "config.audio.max_positions")
    with pytest.raises(A.AudioError) as e:  # a waveform: checked before resampling
        prep.fbank(np.zeros(3 * 22050, np.float32), 22050)
    one_line(e, "298 fbank frames", "203 frames")
    monkeypatch.undo()
    assert prep.fbank(np.zeros(2 * 16000, np.float32) + 0.01, 16000).shape == (198, 80)  # under the limit: fine


def test_bad_audio_files_are_one_line(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(0, np.float32), 16000)  # a valid header, 0 samples
    (tmp_path / "zero.wav").write_bytes(b"")
    (tmp_path / "corrupt.mp3").write_bytes(b"this is not an mp3 file at all " * 20)
    (tmp_path / "folder.wav").mkdir()
    for name, what in [("silent.wav", "0 samples"), ("zero.wav", "empty file"), ("corrupt.mp3", "corrupt"),
                       ("folder.wav", "folder"), ("nothere.wav", "no such audio file")]:
        for fn in (A.audio_features, A.probe_audio):
            with pytest.raises(A.AudioError) as e:
                fn(str(tmp_path / name))
            msg = one_line(e, name, what)
            assert "does not exist" not in msg and "System error" not in msg
    blob = io.BytesIO(b"")
    blob.name = "upload.wav"
    with pytest.raises(A.AudioError) as e:
        A.audio_features(blob)
    one_line(e, "upload.wav")


def test_too_short_audio_is_refused_on_the_header(tmp_path, capsys, monkeypatch):
    """Under 7 fbank frames (85 ms) the speech encoder gives no token: refused from the header, naming the
    file, before the model is loaded (the CLI) and before decoding (the library); 7 frames are fine."""
    sf.write(tmp_path / "blip.wav", np.zeros(1300, np.float32) + 0.01, 16000)  # 6 frames
    sf.write(tmp_path / "ok.wav", np.zeros(1360, np.float32) + 0.01, 16000)  # 7 frames
    assert A.fbank_frames_for(1300, 16000) == 6 and A.fbank_frames_for(1360, 16000) == 7
    rc = cli.main(["generate", "/no/such/model", "--prompt", "hi", "--audio", str(tmp_path / "blip.wav")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "/no/such/model" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vita-jax: error: --audio: {tmp_path / 'blip.wav'}: "), err
    assert "6 fbank frames" in lines[0] and "7 frames" in lines[0]
    monkeypatch.setattr(A.sf, "read", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(A.AudioError) as e:
        preprocess_settings(config_lib.load_config("tiny")).fbank(str(tmp_path / "blip.wav"))
    one_line(e, "blip.wav", "6 fbank frames")
    monkeypatch.undo()
    with pytest.raises(A.AudioError) as e:  # a waveform too
        Preprocess().fbank(np.zeros(1300, np.float32), 16000)
    one_line(e, "<waveform>", "6 fbank frames")
    assert Preprocess().fbank(str(tmp_path / "ok.wav")).shape == (7, 80)
    assert A.load_audio(str(tmp_path / "blip.wav"))[0].shape == (1300,)  # a plain reader keeps no minimum
