"""Loading the LLM from the official layout: every key read, clear errors on a corrupted copy."""
import json
import os
import shutil

import numpy as np
import pytest

import vita_jax
from vita_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, read_header, save_file

from conftest import cli_error

LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")


def test_reads_every_llm_key(tiny_dir):
    m = vita_jax.from_pretrained(tiny_dir)
    with open(os.path.join(tiny_dir, "model.safetensors.index.json")) as f:
        keys = json.load(f)["weight_map"]
    expected = {k for k in keys if k.startswith(LLM_PREFIXES)}
    assert len(expected) == 2 + 2 * 12 + 1  # embed, lm_head, norm, 12 per layer
    vision = {k for k in keys if k.startswith(("model.vision_tower.", "model.mm_projector."))}
    assert len(vision) == 4 + 2 * 14 + 4  # embeddings, 14 per ViT layer, projector
    audio = {k for k in keys if k.startswith("model.audio_encoder.")}
    assert len(m.keys_read) == len(set(m.keys_read)) == len(keys) == 121
    assert set(m.keys_read) == expected | vision | audio
    # values really come from the shards (layer 1's q bias, un-split)
    ref = SafetensorsReader(tiny_dir).get("model.layers.1.self_attn.q_proj.bias")
    got = np.asarray(m.params["llm"]["model"]["layers"]["self_attn"]["q_proj"]["bias"][1]).reshape(-1)
    np.testing.assert_array_equal(got, ref)
    assert m.tokenizer is None
    assert m.config.llm.hidden_size == 64 and m.config.eos_token_id == 502


def _copy(tiny_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("reference", "vita_tts_ckpt"))
    return str(d)


def _rewrite_shard(d, key, new_value=None):
    """Drops ``key`` from its shard (and the index) or replaces its value."""
    index_path = os.path.join(d, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shard = os.path.join(d, index["weight_map"][key])
    reader = SafetensorsReader(d)
    tensors = {k: np.array(reader.get(k)) for k in read_header(shard)[0]}
    del reader
    if new_value is None:
        del tensors[key]
        del index["weight_map"][key]
        with open(index_path, "w") as f:
            json.dump(index, f)
    else:
        tensors[key] = new_value
    save_file(tensors, shard)


def test_missing_tensor_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    key = "model.layers.1.mlp.down_proj.weight"
    _rewrite_shard(d, key)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*missing"):
        vita_jax.from_pretrained(d)


def test_shape_mismatch_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    key = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_shard(d, key, np.zeros((16, 64), np.float32))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        vita_jax.from_pretrained(d)


def test_index_points_to_missing_shard(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        vita_jax.from_pretrained(d)


def test_not_a_release_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        vita_jax.from_pretrained(str(tmp_path))


def test_safetensors_roundtrip_bf16(tmp_path):
    import ml_dtypes
    x = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    y = np.arange(5, dtype=np.int64)
    save_file({"a": x, "b": y}, str(tmp_path / "model.safetensors"))
    r = SafetensorsReader(str(tmp_path))
    assert r.dtype("a") == np.dtype(ml_dtypes.bfloat16) and r.shape("a") == (3, 4)
    np.testing.assert_array_equal(r.get("a").astype(np.float32), x.astype(np.float32))
    np.testing.assert_array_equal(r.get("b"), y)
    # readable by the reference implementation too
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(load_file(str(tmp_path / "model.safetensors"))["b"], y)


def test_vision_from_folder_when_shards_lack_it(tiny_dir, tmp_path):
    """Official behaviour: the ViT comes from the mm_vision_tower folder unless the shards override it."""
    d = _copy(tiny_dir, tmp_path)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        keys = [k for k in json.load(f)["weight_map"] if k.startswith("model.vision_tower.")]
    for k in keys:
        _rewrite_shard(d, k)
    m = vita_jax.from_pretrained(d)
    folder = SafetensorsReader(os.path.join(d, "InternViT-tiny-56px"))
    got = np.asarray(m.params["vision_tower"]["embeddings"]["class_embedding"])
    np.testing.assert_array_equal(got, folder.get("embeddings.class_embedding"))
    assert "embeddings.class_embedding" in m.keys_read


def test_hub_id_vision_tower_builtin(tiny_dir, tmp_path):
    from vita_jax.convert import release
    d = tmp_path / "rel"
    d.mkdir()
    with open(os.path.join(tiny_dir, "config.json")) as f:
        hf = json.load(f)
    hf["mm_vision_tower"] = "OpenGVLab/InternViT-300M-448px"
    hf["mm_hidden_size"] = 4096
    hf["mm_audio_encoder"] = "VITA-MLLM/VITA-1.5_AudioEnc"
    (d / "config.json").write_text(json.dumps(hf))
    c = release.read_config(str(d))
    assert (c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.image_size, c.image.size) == (1024, 24, 448, 448)
    assert (c.audio.attention_dim, c.audio.num_blocks, c.audio.llm_embed_dim) == (1024, 24, 64)
    hf["mm_vision_tower"] = "some-missing-internvit-folder"
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(FileNotFoundError, match="some-missing-internvit-folder"):
        release.read_config(str(d))


def test_audio_from_folder_when_shards_lack_it(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        keys = [k for k in json.load(f)["weight_map"] if k.startswith("model.audio_encoder.")]
    assert len(keys) == 58
    for k in keys:
        _rewrite_shard(d, k)
    m = vita_jax.from_pretrained(d)
    import torch
    sd = torch.load(os.path.join(d, "audio-encoder-tiny-whale/final.pt"), weights_only=True)
    got = np.asarray(m.params["audio_encoder"]["adpter"]["project"]["kernel"])
    np.testing.assert_array_equal(got, sd["adpter.project.weight"].numpy().T)
    assert "adpter.project.weight" in m.keys_read


# ------------------------------------------------------------------ weight dtypes against the model's
@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.uint8])
def test_integer_or_boolean_weight_refused_naming_file_and_key(tiny_dir, tmp_path, dtype):
    """Today's silent cast (int -> float) is a one-line error naming the shard and the key, before any data is read."""
    d = _copy(tiny_dir, tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"][key]
    _rewrite_shard(d, key, np.ones(SafetensorsReader(d).shape(key), dtype))
    with pytest.raises(CheckpointError) as e:
        vita_jax.from_pretrained(d)
    msg = str(e.value)
    assert key in msg and os.path.join(d, shard) in msg
    assert f"stored as {np.dtype(dtype).name} (" in msg and "the model's weight is float32 (float)" in msg
    assert "\n" not in msg


def test_float_precision_change_stays_allowed(tiny_dir, tmp_path):
    import ml_dtypes
    d = _copy(tiny_dir, tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    value = np.array(SafetensorsReader(d).get(key)).astype(ml_dtypes.bfloat16)
    _rewrite_shard(d, key, value)
    m = vita_jax.from_pretrained(d)  # bf16 stored, float32 model
    got = np.asarray(m.params["llm"]["model"]["layers"]["mlp"]["up_proj"]["kernel"][0])
    np.testing.assert_array_equal(got.T, value.astype(np.float32))


def test_integer_weight_in_pt_file_refused(tts_dir, tmp_path):
    import torch

    from vita_jax.convert import tts
    dec = tmp_path / "decoder"
    shutil.copytree(os.path.join(tts_dir, "decoder"), dec)
    sd = torch.load(dec / "final.pt", weights_only=True)
    inner = sd["model"] if "model" in sd else sd
    key = next(k for k, v in inner.items() if v.is_floating_point() and v.ndim == 2)
    inner[key] = inner[key].to(torch.int64)
    torch.save(sd, dec / "final.pt")
    with pytest.raises(CheckpointError, match=f"{key}.*{dec / 'final.pt'}: stored as int64 \\(integer\\)"):
        tts.load_decoder(str(dec))


def test_integer_weight_in_codec_refused(tts_dir, tmp_path):
    import torch

    from vita_jax.convert import tts
    codec = tmp_path / "codec"
    shutil.copytree(os.path.join(tts_dir, "codec"), codec)
    sd = torch.load(codec / "final.pt", weights_only=True)
    key = next(iter(sd["generator"]))
    sd["generator"][key] = sd["generator"][key].to(torch.int32)
    torch.save(sd, codec / "final.pt")
    with pytest.raises(CheckpointError, match=f"generator.*{key}.*final.pt.*int32"):
        tts.load_codec(str(codec))


def test_integer_array_in_orbax_checkpoint_refused(tiny_model, tmp_path):
    import jax

    from vita_jax.convert import orbax_io
    params = jax.tree.map(lambda x: x, tiny_model.params)
    params["mm_projector"]["0"]["kernel"] = np.asarray(params["mm_projector"]["0"]["kernel"]).astype(np.int32)
    orbax_io.save(str(tmp_path / "ck"), tiny_model.config, params)
    with pytest.raises(CheckpointError, match=r"ck/params: array mm_projector/0/kernel: stored as int32"):
        vita_jax.from_pretrained(str(tmp_path / "ck"))


def test_kind_check_both_ways():
    from vita_jax.convert import loader
    loader.check_kind(np.float16, np.float32, "x")  # precision changes are casts
    with pytest.raises(CheckpointError,
                       match=r"f.pt: k: stored as float32 \(float\), the model's weight is int32 \(integer\)"):
        loader.check_kind(np.float32, np.int32, "f.pt: k")


# ---------------------------------------------------------- refused early, one line naming the file, field or option


@pytest.mark.parametrize("meta", ["{", '"a string"', "{}", '{"config": 5}', "\xff\xfe", '{"config": {}}'])
def test_damaged_vita_jax_json_names_the_file(tmp_path, capsys, meta):
    d = tmp_path / "ck"
    (d / "params").mkdir(parents=True)
    (d / "vita_jax.json").write_bytes(meta.encode("latin1"))
    line = cli_error(capsys, "generate", str(d), "--ids", "1,2")
    assert str(d / "vita_jax.json") in line and "damaged" in line
