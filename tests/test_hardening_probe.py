"""Hardening, the cases of a second fresh probe: damaged checkpoint files name the file, media arguments of the
wrong type name the field, options and model sizes that cannot work are refused before anything is loaded or
built (one line, exit code 2 through the CLI, no traceback)."""
import numpy as np
import pytest

from conftest import TINY
from conftest import cli_error as _cli_error


# ------------------------------------------------------------------ checkpoint files that are not what they say
@pytest.mark.parametrize("index", ['"a string"', "[1, 2]", '{"weight_map": "model.safetensors"}',
                                   '{"weight_map": {"lm_head.weight": 3}}', '{"weight_map": {"a": "b"'])
def test_bad_safetensors_index_is_one_line(tmp_path, capsys, index):
    import os
    d = tmp_path / "release"
    d.mkdir()
    for name in os.listdir(TINY):  # the fixture's files (linked), with a damaged index
        if name != "model.safetensors.index.json":
            os.symlink(os.path.join(TINY, name), d / name)
    (d / "model.safetensors.index.json").write_text(index)
    line = _cli_error(capsys, "generate", str(d), "--ids", "1,2")
    assert str(d / "model.safetensors.index.json") in line and "weight_map" in line


@pytest.mark.parametrize("meta", ["{", '"a string"', "{}", '{"config": 5}', "\xff\xfe", '{"config": {}}'])
def test_damaged_vita_jax_json_names_the_file(tmp_path, capsys, meta):
    d = tmp_path / "ck"
    (d / "params").mkdir(parents=True)
    (d / "vita_jax.json").write_bytes(meta.encode("latin1"))
    line = _cli_error(capsys, "generate", str(d), "--ids", "1,2")
    assert str(d / "vita_jax.json") in line and "damaged" in line


@pytest.mark.parametrize("kw, named", [
    (dict(image=7), "image: expected a path, file object or PIL image, got int"),
    (dict(video=["a.mp4"]), "video: expected a path or file object, got list"),
    (dict(audio=7.5), "audio: expected a path, file object or (waveform, sample_rate), got float"),
    (dict(audio=(np.zeros(16000), "16k")), "audio: expected"),
    (dict(image=""), "image: an empty path"),
    (dict(messages=[("user", "hi", 7)]), "messages[0] audio: expected"),
])
def test_media_arguments_of_the_wrong_type_are_named(kw, named):
    from vita_jax.data import chat as chat_lib
    kw = dict(dict(messages="hi"), **kw)
    with pytest.raises(ValueError) as e:  # checked before any preprocessing or tokenizer is used
        chat_lib.chat_example(None, None, kw.pop("messages"), **kw)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_empty_media_option_is_refused_before_loading(capsys):
    line = _cli_error(capsys, "generate", "/no/such/model", "--prompt", "hi", "--image", "")
    assert line == "vita-jax: error: --image: an empty path"


# ------------------------------------------------------------------ the second fresh probe's cases
@pytest.mark.parametrize("args, named", [
    (("generate", "/no/such/model", "--ids", " , "), "--ids: no ids given"),
    (("generate", "/no/such/model", "--prompt", "hi", "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    (("generate", "/no/such/model", "--prompt", "hi", "--speech-max-tokens", "-1"), "--speech-max-tokens -1"),
    (("eval", "--checkpoint", "/no/such/model", "--task", "asr", "--data", "x", "--out", "o", "--max-examples", "-1"),
     "--max-examples -1"),
    (("eval", "--checkpoint", "/no/such/model", "--task", "asr", "--data", "x", "--out", "o", "--batch-size", "0"),
     "--batch-size 0"),
    (("eval", "--checkpoint", "/no/such/model", "--task", "asr", "--data", "x", "--out", __file__), "is a file"),
    (("compile", "--config=stage1_1:tiny", "--topology", "v5e:2x2", "--per-chip-batch", "0"),
     "--per-chip-batch 0"),
    (("compile", "--config=stage1_1:tiny", "--topology", "bogus"), "--topology bogus: expected CHIP:SHAPE"),
])
def test_options_checked_before_loading(capsys, args, named):
    """Refused before the model (or libtpu, which logs on a CPU host) is loaded: /no/such/model is never named."""
    line = _cli_error(capsys, *args)
    assert named in line and "/no/such/model" not in line


@pytest.mark.parametrize("override, named", [
    ("llm.hidden_size=-64", "config.llm.hidden_size = -64: must be an integer >= 1"),
    ("llm.vocab_size=0", "config.llm.vocab_size = 0"),
    ("llm.num_attention_heads=3", "config.llm.num_attention_heads = 3 is not a multiple of"),
    ("vision.patch_size=5", "config.vision.image_size = 56 is not a multiple of config.vision.patch_size = 5"),
    ("mm_hidden_size=100", "config.mm_hidden_size = 100: must be 4 x config.vision.hidden_size = 256"),
    ("audio.attention_heads=5", "config.audio.attention_dim = 32 is not a multiple of config.audio.attention_heads"),
])
def test_model_sizes_that_cannot_build_are_named(capsys, tmp_path, override, named):
    line = _cli_error(capsys, "train", "--config=stage1_1:tiny", f"--config.{override}", "--workdir",
                      str(tmp_path / "wd"))
    assert named in line
    assert not (tmp_path / "wd").exists()  # refused before the work dir was made


def test_heads_need_an_even_width():
    from vita_jax import config as config_lib
    from vita_jax.train import stages
    c = stages.stage_config("1.1", "tiny")
    c.llm.hidden_size = 60  # 4 heads of 15: rotary embedding needs an even width
    with pytest.raises(ValueError, match="config.llm.hidden_size = 60 / num_attention_heads = 4"):
        config_lib.check_model(c)
    c.llm.hidden_size = 72  # 4 heads of 18: fine
    config_lib.check_model(c)
    for stage in ("1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.2"):  # every shipped config passes
        config_lib.check_model(stages.stage_config(stage))
        config_lib.check_model(stages.stage_config(stage, "tiny"))


def test_data_file_that_is_not_utf8_names_the_file(tmp_path):
    from vita_jax.data import sources
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "a", "conversations": [{"from": "human", "value": "h\xe9"}]}]'.encode("latin1"))
    with pytest.raises(ValueError, match=f"{path}: cannot read the data file: 'utf-8' codec"):
        sources.OfficialJSON(str(path))


@pytest.mark.parametrize("ids", [np.zeros((1, 0), np.int64), np.asarray([[1.5, 2.0]]), [[True, False]]])
def test_generate_needs_integer_ids(tiny_model, ids):
    with pytest.raises(ValueError, match="input_ids: expected a non-empty array of integer ids"):
        tiny_model.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("rate", [0, -16000, float("nan"), "16k", True])
def test_waveform_rate_is_checked(rate):
    from vita_jax.data import audio
    with pytest.raises(audio.AudioError, match="<waveform>: sample_rate .* must be a positive number"):
        audio.audio_features(np.zeros(16000, np.float32), rate)


def test_missing_tokenizer_is_named_before_loading(capsys):
    from vita_jax import cli
    assert cli.main(["generate", TINY, "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert err == f"vita-jax: error: {TINY} has no tokenizer.json: give the prompt as --ids\n"
    assert "loaded" not in out  # the model was not loaded first


@pytest.mark.parametrize("args, named", [
    (("serve", "--checkpoint", "/no/such/model", "--image-tiles", "0"), "--image-tiles must be at least 1, got 0"),
    (("serve", "--checkpoint", "/no/such/model", "--max-prompt", "0"), "--max-prompt must be at least 1, got 0"),
    (("train", "--config=", "--workdir", "wd"), "--config=: no config file given"),
    (("train", "--config=stage1_1:tiny", "--config.tokenizer_model_max_length=0", "--workdir", "wd"),
     "config.tokenizer_model_max_length = 0: must be at least 1"),
])
def test_serve_and_config_values_checked_first(capsys, tmp_path, args, named):
    line = _cli_error(capsys, *[str(tmp_path / "wd") if a == "wd" else a for a in args])
    assert named in line and "/no/such/model" not in line
    assert not (tmp_path / "wd").exists()
