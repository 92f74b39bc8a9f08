"""Writing a model back to the official release layout (and orbax checkpoints).

The PyTorch layout walks the same key tables as the import, backwards: each Flax leaf is gathered
to the host alone, split into per-layer tensors, converted to the PyTorch layout and cast to the
dtype the source checkpoint stored (bf16 stays bf16); tensors are packed into safetensors shards
of at most ``max_shard_bytes``, so host memory peaks near one shard plus one leaf. Everything is
written into a sibling temporary folder that replaces the target only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import jax
import ml_dtypes
import numpy as np

from vita_jax.convert import loader, release
from vita_jax.convert.safetensors_io import CheckpointError, save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "generation_config.json")


def _prepare_target(dst: str, overwrite: bool) -> str:
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True to replace it)")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial-", dir=parent)


def _commit(tmp: str, dst: str) -> None:
    dst = os.path.abspath(dst)
    if os.path.exists(dst):
        old = dst + ".old"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def _official_tensors(config, params, source_dtypes: dict):
    """Yields ``(official key, numpy tensor)`` one at a time, in key-table order, in the dtype the
    source checkpoint stored (float32 otherwise)."""
    for name, (_, _, rules) in release.build_parts(config).items():
        for key, arr in loader.official_tensors(rules, params[name]):
            want = source_dtypes.get(key)
            if want is not None and arr.dtype != want:
                arr = arr.astype(want)
            elif arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            yield key, arr


def _hf_config(config, src_dir: Optional[str]) -> dict:
    """The official config.json: the source's fields (unknown ones kept) updated from ``config``."""
    hf = {}
    if src_dir and os.path.exists(os.path.join(src_dir, "config.json")):
        with open(os.path.join(src_dir, "config.json")) as f:
            hf = json.load(f)
    hf.setdefault("architectures", ["VITAQwen2ForCausalLM"])
    hf.setdefault("model_type", "vita-Qwen2")
    hf.setdefault("hidden_act", "silu")
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
        hf[k] = config.llm[k]
    if config.has_vision:
        hf.update(mm_vision_tower=config.mm_vision_tower, mm_hidden_size=config.mm_hidden_size,
                  mm_projector_type=config.mm_projector_type)
    if config.has_audio:
        hf["mm_audio_encoder"] = config.mm_audio_encoder
    for k in ("bos_token_id", "eos_token_id"):
        if config[k] >= 0:
            hf[k] = config[k]
    hf["tokenizer_model_max_length"] = config.tokenizer_model_max_length
    return hf


def save_pytorch(model, dst: str, max_shard_bytes: int = 5 * 1024 ** 3, overwrite: bool = False) -> dict:
    """Writes ``model`` in the official release layout; returns the index."""
    config, src = model.config, model.path
    tmp = _prepare_target(dst, overwrite)
    try:
        shards, cur, cur_bytes, weight_map, total = [], {}, 0, {}, 0

        def flush():
            nonlocal cur, cur_bytes
            if cur:
                name = f"shard-{len(shards):05d}.tmp"
                save_file(cur, os.path.join(tmp, name), metadata={"format": "pt"})
                shards.append((name, list(cur)))
                cur, cur_bytes = {}, 0
        for key, arr in _official_tensors(config, model.params, model.source_dtypes):
            if cur and cur_bytes + arr.nbytes > max_shard_bytes:
                flush()
            cur[key] = arr
            cur_bytes += arr.nbytes
            total += arr.nbytes
        flush()
        n = len(shards)
        for i, (name, keys) in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(_hf_config(config, src), f, indent=2)
        _copy_side_files(model, src, tmp)
        _commit(tmp, dst)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_tokenizer(model, dst: str) -> None:
    """The tokenizer files of the model's source folder, or of wherever its tokenizer was read from."""
    tok = getattr(model, "tokenizer", None)
    for src in (model.path, os.path.dirname(tok.path) if tok is not None and tok.path else None):
        if src and os.path.exists(os.path.join(src, "tokenizer.json")):
            for f in TOKENIZER_FILES:
                if os.path.exists(os.path.join(src, f)):
                    shutil.copy2(os.path.join(src, f), dst)
            return


def _copy_side_files(model, src: Optional[str], tmp: str) -> None:
    """Tokenizer files, ``vita_tts_ckpt`` and the vision / audio-encoder folders. A folder the
    config names is copied from the source; when the source has none it is generated (configs from
    the model config, weights from the model, as the official constructor reads them); hub ids
    (the built-in towers) get no folder, as in the official release."""
    from vita_jax.models import internvit, whale
    config = model.config
    _copy_tokenizer(model, tmp)
    if getattr(model, "speech", None) is not None:
        model.speech.save(os.path.join(tmp, "vita_tts_ckpt"))
    for has, attr, hub, write in ((config.has_vision, "mm_vision_tower", internvit.HUB_ID, _write_vision_folder),
                                  (config.has_audio, "mm_audio_encoder", whale.HUB_ID, _write_audio_folder)):
        rel = config[attr]
        if not has or os.path.isabs(rel) or rel == hub:
            continue
        if src and os.path.isdir(os.path.join(src, rel)):
            shutil.copytree(os.path.join(src, rel), os.path.join(tmp, rel))
        else:
            write(model, os.path.join(tmp, rel))


def _write_vision_folder(model, folder: str) -> None:
    from vita_jax.models import internvit
    c, im = model.config.vision, model.config.image
    os.makedirs(folder, exist_ok=True)
    hf = dict(c.to_dict(), architectures=["InternVisionModel"], model_type="intern_vit_6b", norm_type="layer_norm",
              qk_normalization=False, hidden_act="gelu", dropout=0.0, attention_dropout=0.0, drop_path_rate=0.0,
              initializer_factor=1.0, initializer_range=0.02, use_flash_attn=False)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": im.crop_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(im.mean),
                   "image_std": list(im.std), "resample": im.resample, "size": im.size}, f, indent=2)
    tensors = dict(loader.official_tensors(internvit.key_table(model.vit_cfg, ""), model.params["vision_tower"]))
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _write_audio_folder(model, folder: str) -> None:
    """``train.yaml``, ``global_cmvn`` and (with torch installed) ``final.pt``."""
    import yaml
    from vita_jax.models import whale
    a, params = model.config.audio, model.params
    os.makedirs(folder, exist_ok=True)
    tr = {"transformer-input-dim": a.attention_dim, "transformer-output-dim": a.attention_dim,
          "transformer-attention-dim": a.attention_dim, "transformer-attention-heads": a.attention_heads,
          "transformer-linear-units": a.linear_units, "transformer-num-blocks": a.num_blocks,
          "transformer-input-layer": "linear", "transformer-pos-enc-class": "rel-enc",
          "transformer-normalize-before": True, "transformer-concat-after": False,
          "transformer-dynamic-chunks": False, "transformer-chunk_size": a.chunk_size,
          "transformer-left_chunks": a.left_chunks}
    y = {"input_dim": a.input_dim, "is_json_cmvn": True, "cmvn_file": "global_cmvn",
         "encoder_conf": {"overview_conf": {"encoder-input-dim": a.input_dim, "encoder-output-dim": a.attention_dim,
                                            "encoder-layer-config": "subsampling-transformer"},
                          "para_conf": {"subsampling": {"subsampling-rate": 4, "subsampling-input-dim": a.input_dim,
                                                        "subsampling-output-dim": a.attention_dim},
                                        "transformer": tr}},
         "model_conf": {"enc_out_dim": a.attention_dim, "llm_embed_dim": model.config.llm.hidden_size, "kernel_size": a.kernel_size,
                        "adpter_type": "subsampling", "activation_func": a.activation, "norm": "layer",
                        "add_audio_bos_eos": False},
         "dataset_conf": {"resample_conf": {"resample_rate": 16000},
                          "fbank_conf": {"num_mel_bins": a.input_dim, "frame_length": 25, "frame_shift": 10,
                                         "dither": a.dither}}}
    with open(os.path.join(folder, "train.yaml"), "w") as f:
        yaml.safe_dump(y, f, sort_keys=False)
    enc = params["audio_encoder"]["encoder"]
    mean = np.asarray(enc["cmvn_mean"], np.float64)
    istd = np.asarray(enc["cmvn_istd"], np.float64)
    with open(os.path.join(folder, "global_cmvn"), "w") as f:  # frame_num 1: mean_stat = mean, var_stat = E[x^2]
        json.dump({"mean_stat": mean.tolist(), "var_stat": (1.0 / istd ** 2 + mean ** 2).tolist(), "frame_num": 1}, f)
    try:
        import torch
    except ImportError:
        return
    sd = {k: torch.from_numpy(v.astype(np.float32))
          for k, v in loader.official_tensors(whale.key_table(model.whale_cfg, prefix=""), params["audio_encoder"])}
    torch.save(sd, os.path.join(folder, "final.pt"))


# ------------------------------------------------------------------------------------- orbax
ORBAX_META = "vita_jax.json"


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.exists(os.path.join(path, ORBAX_META))


def save_orbax(model, dst: str, overwrite: bool = False) -> None:
    """``dst/params`` (orbax, sharded arrays written in parallel), ``dst/vita_jax.json`` (config and
    source dtypes) and the tokenizer files."""
    import jax
    import orbax.checkpoint as ocp
    multi = jax.process_count() > 1
    if multi:  # every process writes its shards into one shared folder; process 0 does the rest
        from jax.experimental import multihost_utils
        tmp = os.path.abspath(dst) + ".partial"
        if jax.process_index() == 0:
            if os.path.exists(dst) and os.listdir(dst) and not overwrite:
                raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True to replace it)")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        multihost_utils.sync_global_devices("vita_jax.save_orbax:prepared")
    else:
        tmp = _prepare_target(dst, overwrite)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), model.params)
        ckptr.wait_until_finished()
        if multi and jax.process_index() != 0:
            multihost_utils.sync_global_devices("vita_jax.save_orbax:committed")
            return
        meta = {"format": "vita_jax", "version": 1, "config": json.loads(model.config.to_json()),
                "source_dtypes": {k: np.dtype(v).name for k, v in model.source_dtypes.items()}}
        with open(os.path.join(tmp, ORBAX_META), "w") as f:
            json.dump(meta, f, indent=1)
        _copy_tokenizer(model, tmp)
        if getattr(model, "speech", None) is not None:
            model.speech.save(os.path.join(tmp, "vita_tts_ckpt"))
        _commit(tmp, dst)
        if multi:
            multihost_utils.sync_global_devices("vita_jax.save_orbax:committed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_orbax(path: str, dtype=None, mesh=None):
    """Returns ``(config, params, source_dtypes)`` of a checkpoint written by :func:`save_orbax`,
    restored straight into the shardings of ``mesh`` (or the default device)."""
    import flax.linen as nn
    import ml_collections
    import orbax.checkpoint as ocp
    from vita_jax import parallel
    with open(os.path.join(path, ORBAX_META)) as f:
        meta = json.load(f)
    config = ml_collections.ConfigDict(meta["config"])
    if dtype is not None:
        config.dtype = config.param_dtype = np.dtype(dtype).name
    target = {}
    for name, (module, example, _) in release.build_parts(config).items():
        boxed = release.abstract_part(module, example)
        if mesh is not None:
            sh = nn.unbox(parallel.param_shardings(boxed, mesh))
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            sh = jax.tree.map(lambda _: dev, nn.unbox(boxed))
        target[name] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), sh)
    try:
        params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
    except Exception as e:
        raise CheckpointError(f"{path}/params: cannot restore the orbax checkpoint: {e}") from e
    dtypes = {k: np.dtype(ml_dtypes.bfloat16) if v == "bfloat16" else np.dtype(v)
              for k, v in meta.get("source_dtypes", {}).items()}
    return config, params, dtypes
