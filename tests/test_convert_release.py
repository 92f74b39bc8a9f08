"""Official layout -> vita_jax -> official layout, bitwise; orbax checkpoints; errors before writing."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

import vita_jax
from vita_jax import cli
from vita_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, read_header, save_file

from conftest import TINY, cli_error, file_tree


def _same_tensors(a_dir, b_dir):
    a, b = SafetensorsReader(a_dir), SafetensorsReader(b_dir)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k


def _index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)


def test_roundtrip_fixture_bitwise(tiny_dir, tmp_path):
    out = tmp_path / "out"
    m = vita_jax.from_pretrained(tiny_dir)
    idx = m.save_pretrained(str(out), max_shard_bytes=700_000)
    _same_tensors(tiny_dir, str(out))
    assert len(set(idx["weight_map"].values())) >= 2  # really sharded, index consistent
    assert idx["metadata"]["total_size"] == sum(SafetensorsReader(str(out)).get(k).nbytes for k in idx["weight_map"])
    with open(out / "config.json") as f:
        hf = json.load(f)
    with open(os.path.join(tiny_dir, "config.json")) as f:
        src = json.load(f)
    assert hf == src
    for folder in ("InternViT-tiny-56px", "audio-encoder-tiny-whale"):
        assert sorted(os.listdir(out / folder)) == sorted(os.listdir(os.path.join(tiny_dir, folder)))
    # and it loads again, same outputs
    assert "adpter.conv1d2.weight" in "".join(_index(str(out))["weight_map"])


def _bf16_copy(tiny_dir, dst):
    shutil.copytree(tiny_dir, dst, ignore=shutil.ignore_patterns("reference", "vita_tts_ckpt"))
    idx = _index(dst)
    for shard in sorted(set(idx["weight_map"].values())):
        path = os.path.join(dst, shard)
        r = SafetensorsReader(dst)
        tensors = {k: (np.array(r.get(k)).astype(ml_dtypes.bfloat16) if r.get(k).dtype == np.float32
                       else np.array(r.get(k)))
                   for k in read_header(path)[0]}
        del r
        save_file(tensors, path)


def test_roundtrip_bf16_bitwise(tiny_dir, tmp_path):
    src = str(tmp_path / "bf16")
    _bf16_copy(tiny_dir, src)
    assert SafetensorsReader(src).dtype("model.layers.0.mlp.up_proj.weight") == np.dtype(ml_dtypes.bfloat16)
    m = vita_jax.from_pretrained(src)  # held in float32, written back as the source's bf16
    m.save_pretrained(str(tmp_path / "out"))
    _same_tensors(src, str(tmp_path / "out"))
    import jax.numpy as jnp
    m16 = vita_jax.from_pretrained(src, dtype=jnp.bfloat16)
    m16.save_pretrained(str(tmp_path / "out16"))
    _same_tensors(src, str(tmp_path / "out16"))


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_orbax_roundtrip(tiny_dir, tmp_path):
    m = vita_jax.from_pretrained(tiny_dir)
    m.save_pretrained(str(tmp_path / "ckpt"), format="orbax")
    m2 = vita_jax.from_pretrained(str(tmp_path / "ckpt"))
    f = np.load(os.path.join(tiny_dir, "reference/forward.npz"))
    media = dict(pixel_values=f["images"][:3], audio_features=f["audio_feats"], audio_lengths=f["audio_lengths"])
    assert m2.loss(f["input_ids"], f["attention_mask"], f["labels"], **media) == \
        m.loss(f["input_ids"], f["attention_mask"], f["labels"], **media)
    m2.save_pretrained(str(tmp_path / "back"))
    _same_tensors(tiny_dir, str(tmp_path / "back"))


def _corrupt(tiny_dir, tmp_path, how):
    d = str(tmp_path / "src")
    shutil.copytree(tiny_dir, d, ignore=shutil.ignore_patterns("reference", "vita_tts_ckpt"))
    idx = _index(d)
    if how == "missing_shard":
        os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
        return d, "model-00002-of-00002.safetensors"
    key = "model.layers.1.mlp.gate_proj.weight"
    shard = os.path.join(d, idx["weight_map"][key])
    r = SafetensorsReader(d)
    tensors = {k: np.array(r.get(k)) for k in read_header(shard)[0]}
    del r
    if how == "key_not_in_index":
        del idx["weight_map"][key]
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(idx, f)
        return d, key
    if how == "wrong_shape":
        tensors[key] = np.zeros((64, 64), np.float32)
        save_file(tensors, shard)
        return d, key
    extra = "model.layers.1.mlp.extra_proj.weight"
    tensors[extra] = np.zeros((4, 4), np.float32)
    save_file(tensors, shard)
    idx["weight_map"][extra] = idx["weight_map"][key]
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump(idx, f)
    return d, extra


@pytest.mark.parametrize("how", ["missing_shard", "key_not_in_index", "wrong_shape", "unknown_extra_key"])
def test_bad_source_fails_before_writing(tiny_dir, tmp_path, how):
    src, name = _corrupt(tiny_dir, tmp_path, how)
    dst = tmp_path / "dst"
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        cli.run(["convert", "--to", "pytorch", src, str(dst)])
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("dst")]


def test_existing_target_kept(tiny_dir, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        cli.run(["convert", "--to", "orbax", tiny_dir, str(dst)])
    assert (dst / "precious.txt").read_text() == "keep me"


def test_cli_convert_both_ways(tiny_dir, tmp_path):
    assert cli.main(["convert", "--to", "orbax", tiny_dir, str(tmp_path / "o")]) == 0
    assert cli.main(["convert", "--to", "pytorch", str(tmp_path / "o"), str(tmp_path / "p")]) == 0
    _same_tensors(tiny_dir, str(tmp_path / "p"))


def test_pt_files_only_weights_only(tiny_dir, tmp_path, monkeypatch):
    import torch

    from vita_jax.convert.torch_io import TorchReader
    seen = []
    real = torch.load

    def spy(*a, **k):
        seen.append(k.get("weights_only"))
        return real(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    TorchReader(os.path.join(tiny_dir, "audio-encoder-tiny-whale/final.pt"))
    assert seen == [True]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    bad = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="evil.pt"):
        TorchReader(str(bad))


def test_relative_paths(tiny_dir, tmp_path, monkeypatch):
    """The README's own example: ``vita-jax convert --to orbax RELEASE ckpt/vita15`` and back, relative paths."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", "--to", "orbax", tiny_dir, "ckpt/vita15"]) == 0
    assert cli.main(["convert", "--to", "pytorch", "ckpt/vita15", "out"]) == 0
    _same_tensors(tiny_dir, str(tmp_path / "out"))
    assert vita_jax.from_pretrained("ckpt/vita15").config.llm.hidden_size == 64


def _cli_error(capsys, *args):
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("to", ["orbax", "pytorch"])
def test_overwrite_replaces_only_what_vita_jax_wrote(tiny_dir, tmp_path, capsys, to):
    dst = tmp_path / "dst"
    assert cli.main(["convert", "--to", to, tiny_dir, str(dst)]) == 0
    assert cli.main(["convert", "--to", to, "--overwrite", tiny_dir, str(dst)]) == 0  # its own output: replaced
    (dst / "notes.txt").write_text("mine")
    (dst / "runs").mkdir()
    before = sorted(os.listdir(dst))
    line = _cli_error(capsys, "convert", "--to", to, "--overwrite", tiny_dir, str(dst))
    assert line.startswith("vita-jax: error: ") and str(dst) in line and "notes.txt, runs" in line
    assert sorted(os.listdir(dst)) == before and (dst / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["dst"]  # no temporary folder left either


def test_leftovers_of_a_killed_convert_are_cleaned(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    killed = tmp_path / "out.partial-k1ll3d_x"  # what a kill during the write leaves
    (killed / "params").mkdir(parents=True)
    for name in ("out.partial-notes", "out-old", "other.partial-abcdefgh"):  # not this target's temporary names
        (tmp_path / name).mkdir()
    assert cli.main(["convert", "--to", "orbax", tiny_dir, str(dst)]) == 0
    assert f"{dst}: removed out.partial-k1ll3d_x, left by an interrupted write" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["other.partial-abcdefgh", "out", "out-old", "out.partial-notes"]


def test_overwrite_killed_between_its_renames_puts_the_old_target_back(tmp_path):
    from vita_jax.convert import target
    said = []
    (tmp_path / "out.partial-abcd1234.old").mkdir()  # the previous target, moved aside by the commit
    (tmp_path / "out.partial-abcd1234.old" / "vita_jax.json").write_text("{}")
    (tmp_path / "out.partial-abcd1234").mkdir()      # the new one, not yet moved in
    target.clean_leftovers(str(tmp_path / "out"), said.append)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "vita_jax.json").exists()
    assert len(said) == 2 and "put back from out.partial-abcd1234.old" in said[0]


# --------------------------------------------- refused early, nothing lost (slow, as the old test_hardening.py was)


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
@pytest.mark.parametrize("target", ["SRC", "SRC/inside", "PARENT", "LINK", "LINK/inside"])
def test_convert_overwrite_never_touches_the_source(tmp_path, capsys, target):
    src = tmp_path / "release"
    shutil.copytree(TINY, src)
    os.symlink(src, tmp_path / "link")
    before, around = file_tree(src), sorted(os.listdir(tmp_path))
    dst = {"SRC": str(src), "SRC/inside": str(src / "vita_tts_ckpt"), "PARENT": str(tmp_path),
           "LINK": str(tmp_path / "link"), "LINK/inside": str(tmp_path / "link" / "sub")}[target]
    for fmt in ("orbax", "pytorch"):
        line = cli_error(capsys, "convert", "--to", fmt, "--overwrite", str(src), dst)
        assert dst in line and str(src) in line
    assert file_tree(src) == before and sorted(os.listdir(tmp_path)) == around  # nothing written, nothing deleted


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_save_pretrained_refuses_its_source(tmp_path):
    src = tmp_path / "release"
    shutil.copytree(TINY, src)
    before = file_tree(src)
    m = vita_jax.from_pretrained(str(src))
    for dst in (src, tmp_path, src / "sub"):
        with pytest.raises(ValueError, match="source"):
            m.save_pretrained(str(dst), format="orbax", overwrite=True)
    assert file_tree(src) == before and sorted(os.listdir(tmp_path)) == ["release"]


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_release_config_json_is_checked(tmp_path):
    from vita_jax.convert import release
    d = tmp_path / "rel"
    shutil.copytree(TINY, d)
    (d / "config.json").write_text("64")
    with pytest.raises(ValueError, match="expected a JSON object"):
        release.read_config(str(d))
    hf = json.load(open(f"{TINY}/config.json"))
    (d / "config.json").write_text(json.dumps(dict(hf, hidden_size="sixty-four")))
    with pytest.raises(ValueError, match="'hidden_size' = 'sixty-four'"):
        release.read_config(str(d))
