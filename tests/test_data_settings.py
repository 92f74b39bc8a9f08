"""Every `config.data` field the data path reads is checked (type, range, allowed values) before anything is
built (issue #24 item 5): one line naming the field, no work dir made; `vita-jax compile` checks them too."""
import json

import pytest

from conftest import cli_error


@pytest.mark.parametrize("override, named", [
    ("audio_buckets=[3000, 2]", "config.data.audio_buckets[0] = 3000: must be [frames, slots], two integers"),
    ("audio_buckets=[[3000]]", "config.data.audio_buckets[0] = [3000]: must be [frames, slots]"),
    ("audio_buckets=[[64, 2], [64.5, 1]]", "config.data.audio_buckets[1] = [64.5, 1]: must be [frames, slots]"),
    ("audio_buckets=[[0, 2]]",
     "config.data.audio_buckets[0] = [0, 2]: frames 0 must be in 1 .. config.data.max_frames"),
    ("audio_buckets=[[4000, 2]]", "frames 4000 must be in 1 .. config.data.max_frames = 128"),
    ("audio_buckets=[[64, 0]]", "config.data.audio_buckets[0] = [64, 0]: slots 0 must be at least 1"),
    ("audio_buckets=[[64, 1], [64, 2]]", "a frames length given twice"),
    ("audio_buckets=3000", "--config.data.audio_buckets=3000: Could not override field"),  # ml_collections' types
    ("tile_budget=-4", "config.data.tile_budget = -4: must be an integer >= 0"),
    ("calibration_examples=0", "config.data.calibration_examples = 0: must be an integer >= 1"),
    ("budgets=atuo", "config.data.budgets = 'atuo': must be 'auto' or 'fixed'"),
    ("max_tiles_per_sample=-1", "config.data.max_tiles_per_sample = -1: must be an integer >= 0"),
    ("max_clips_per_sample=-1", "config.data.max_clips_per_sample = -1: must be an integer >= 0"),
    ("max_frames=2.5", "--config.data.max_frames=2.5: Could not override field"),
    ("synthetic_size=0", "config.data.synthetic_size = 0: must be an integer >= 1"),
    ("shuffle_seed=-1", "config.data.shuffle_seed = -1: must be an integer >= 0"),
    ('mixture=[{"json": "a.json", "wieght": 2}]', "config.data.mixture[0]: unknown key 'wieght'"),
    ('mixture=[{"json": "a.json", "media_root": 5}]', "config.data.mixture[0]: media_root 5 must be a string"),
    ('mixture=["a.json"]', "config.data.mixture[0] = 'a.json': each entry needs a 'json' key"),
    ('tfds=[{"name": "x", "weight": 0}]', "config.data.tfds[0]: weight 0 must be a number > 0"),
])
def test_data_fields_are_checked_before_anything_is_built(capsys, tmp_path, override, named):
    line = cli_error(capsys, "train", "--config=stage1_1:tiny", f"--config.data.{override}", "--workdir",
                     str(tmp_path / "wd"))
    assert named in line
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("override, named", [
    ("heldout_seconds=0.0", "config.data.heldout_seconds = 0.0: must be a finite number > 0"),
    ("heldout_every=-1", "config.data.heldout_every = -1: must be an integer >= 0"),
    ("train=[5]", "config.data.train = [5]: must be a list of wav folders"),
    ('heldout=["", 3]', "config.data.heldout = ['', 3]: must be a list of wav folders"),
])
def test_stage_3_1_data_fields_are_checked(capsys, tmp_path, override, named):
    line = cli_error(capsys, "train", "--config=stage3_1:tiny", f"--config.data.{override}", "--workdir",
                     str(tmp_path / "wd"))
    assert named in line
    assert not (tmp_path / "wd").exists()


def test_compile_checks_the_data_fields_first(capsys):
    line = cli_error(capsys, "compile", "--config=stage1_1", "--topology", "v5p:2x2x1", "--config.data.budgets=Auto")
    assert line == "vita-jax: error: config.data.budgets = 'Auto': must be 'auto' or 'fixed'"


def test_every_shipped_stage_config_passes():
    from vita_jax.data import settings
    from vita_jax.train import stages
    for stage in ("1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.1", "3.2"):
        for variant in ("", "tiny") + (("narrow",) if stage != "3.1" else ()):
            settings.check(stages.stage_config(stage, variant))


def test_the_demos_stage_settings_pass():
    """The demo's text-only stage 0 has no tile slots (``max_tiles_per_sample = 0``): allowed, as 0 clips are."""
    from vita_jax.data import settings
    from vita_jax.demo.plan import PLAN, base_stage
    from vita_jax.train import stages
    for stage, plan in PLAN.items():
        if stage in ("2.1a", "3.1", "3.2"):  # their own batches (CTC, codec, TTS), not the LM data path
            continue
        c = stages.stage_config(base_stage(stage), "tiny")
        tiles, clips = plan[5]
        c.data.update(max_tiles_per_sample=tiles, max_clips_per_sample=clips)
        settings.check(c)
    assert PLAN["0"][5][0] == 0


def test_good_buckets_and_entries_pass():
    import ml_collections

    from vita_jax.data import settings
    from vita_jax.train import stages
    c = stages.stage_config("1.1", "tiny")
    c.data.audio_buckets = [[64, 2], (128, 1)]
    c.data.mixture = [ml_collections.ConfigDict(dict(json="a.json", weight=2, media_root="m", sets={"x": "y"},
                                                     allow_outside_root=True))]
    c.data.tfds = json.loads('[{"name": "ds", "split": "train", "data_dir": "d", "weight": 0.5}]')
    settings.check(c)


@pytest.mark.parametrize("lst, named", [
    ("ok.wav\nnothere.wav\n", "wavs.lst line 2: {d}/nothere.wav: not a readable audio file"),
    ("ok.wav\n|speaker\n", "wavs.lst line 2: no wav path before '|'"),
    (b"ok.wav\n\xff\xfe\n", "wavs.lst: not a wav list (not UTF-8 text"),
])
def test_stage_3_1_wav_list_lines_are_named(capsys, tmp_path, lst, named):
    import numpy as np
    import soundfile as sf
    sf.write(str(tmp_path / "ok.wav"), np.zeros(24000, np.float32), 24000)
    (tmp_path / "wavs.lst").write_bytes(lst if isinstance(lst, bytes) else lst.encode())
    train = "--config.data.train=" + json.dumps([str(tmp_path / "wavs.lst")])
    line = cli_error(capsys, "train", "--config=stage3_1:tiny", train, "--workdir", str(tmp_path / "wd"))
    assert named.format(d=tmp_path) in line
