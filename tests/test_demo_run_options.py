"""`vita-jax demo`'s options are checked before anything starts (issue #24 item 4): a `--codec` folder that is
missing or incomplete, an `--until` that is no stage: one line, no work dir made, no stage trained."""
import pytest

from conftest import TINY, cli_error


@pytest.mark.parametrize("codec, named", [
    ("missing", "--codec {}: does not exist"),
    ("file", "--codec {}: not a folder"),
    ("empty", "--codec {}: no model.json or final.pt in it"),
    ("no_pt", "--codec {}: no final.pt in it"),
])
def test_bad_codec_folder_is_refused_first(tmp_path, capsys, codec, named):
    path = tmp_path / codec
    if codec == "file":
        path.write_text("x")
    elif codec != "missing":
        path.mkdir()
    if codec == "no_pt":
        (path / "model.json").write_text(open(f"{TINY}/vita_tts_ckpt/codec/model.json").read())
    line = cli_error(capsys, "demo", "--workdir", str(tmp_path / "wd"), "--codec", str(path), "--speech",
                     "recordings", "--no-progress")
    assert named.format(path) in line
    assert not (tmp_path / "wd").exists()  # nothing written, no stage run


def test_codec_folder_is_read_before_the_demo_starts(tmp_path):
    from vita_jax.demo import Demo
    demo = Demo(str(tmp_path / "wd"), codec=f"{TINY}/vita_tts_ckpt/codec", speech="recordings", log=lambda *a: None)
    assert demo.codec()[0].n_codes > 0 and demo.codec_source.startswith("TiCodec from ")


def test_unknown_until_stage_is_refused_first(tmp_path, capsys):
    line = cli_error(capsys, "demo", "--workdir", str(tmp_path / "wd"), "--until", "9", "--speech", "recordings")
    assert "--until 9: not a demo stage" in line
    assert not (tmp_path / "wd").exists()
