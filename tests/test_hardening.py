"""Hardening: options and inputs that cannot work stop early with one line naming the option, file or
key (exit code 2 through the CLI, no traceback), and nothing is lost."""
import numpy as np
import pytest

from conftest import TINY
from vita_jax import cli
from vita_jax.infer import generate as gen


def _cli_error(capsys, *args):
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vita-jax: error: "), err
    return lines[0]


# the checkpoint does not exist: a message naming the option proves nothing was loaded first
@pytest.mark.parametrize("opts, named", [
    (("--sample", "--top-p", "0"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--top-p", "-0.1"), "--top-p"),
    (("--top-k", "-1"), "--top-k"),
    (("--sample", "--temperature", "0"), "--temperature"),
    (("--sample", "--temperature", "-1"), "--temperature"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--image", "a.png", "--video", "b.mp4"), "--video and --image"),
])
def test_generate_options_checked_before_loading(capsys, opts, named):
    line = _cli_error(capsys, "generate", "/no/such/model", "--prompt", "hi", *opts)
    assert named in line and "/no/such/model" not in line


def test_greedy_ignores_temperature_zero():
    gen.check_sampling(8, do_sample=False, temperature=0.0, top_k=0, top_p=1.0)  # greedy: temperature unused
    gen.check_sampling(1, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)   # top_k 0 = off


@pytest.mark.parametrize("field, kw", [("top_p", dict(top_p=0.0)), ("top_k", dict(top_k=-2)),
                                       ("temperature", dict(temperature=0.0)),
                                       ("max_new_tokens", dict(max_new_tokens=0))])
def test_library_names_the_field(tiny_model, field, kw):
    sampling = dict(max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0, top_p=1.0) | kw
    with pytest.raises(ValueError, match=field):
        tiny_model.generate(np.asarray([[1, 2, 3]]), **sampling)
    with pytest.raises(ValueError, match=field):
        tiny_model.chat("hi", **sampling)


def test_top_p_tiny_keeps_the_top_token():
    """Even a top_p below every probability keeps the most likely token (never all masked -> id 0)."""
    import jax
    logits = np.asarray([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 0.0, 9.0]], np.float32)
    for seed in range(5):
        ids = gen.sample_logits(logits, jax.random.PRNGKey(seed), True, 1.0, 0, 1e-9)
        assert list(np.asarray(ids)) == [2, 3]


def test_chat_refuses_image_and_video(tiny_model):
    with pytest.raises(ValueError, match="image and video"):
        tiny_model.chat_inputs("hi", image="a.png", video="b.mp4")


def _tree(root):
    import os
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("target", ["SRC", "SRC/inside", "PARENT", "LINK", "LINK/inside"])
def test_convert_overwrite_never_touches_the_source(tmp_path, capsys, target):
    import os
    import shutil
    src = tmp_path / "release"
    shutil.copytree(TINY, src)
    os.symlink(src, tmp_path / "link")
    before, around = _tree(src), sorted(os.listdir(tmp_path))
    dst = {"SRC": str(src), "SRC/inside": str(src / "vita_tts_ckpt"), "PARENT": str(tmp_path),
           "LINK": str(tmp_path / "link"), "LINK/inside": str(tmp_path / "link" / "sub")}[target]
    for fmt in ("orbax", "pytorch"):
        line = _cli_error(capsys, "convert", "--to", fmt, "--overwrite", str(src), dst)
        assert dst in line and str(src) in line
    assert _tree(src) == before and sorted(os.listdir(tmp_path)) == around  # nothing written, nothing deleted


def test_save_pretrained_refuses_its_source(tmp_path):
    import os
    import shutil
    import vita_jax
    src = tmp_path / "release"
    shutil.copytree(TINY, src)
    before = _tree(src)
    m = vita_jax.from_pretrained(str(src))
    for dst in (src, tmp_path, src / "sub"):
        with pytest.raises(ValueError, match="source"):
            m.save_pretrained(str(dst), format="orbax", overwrite=True)
    assert _tree(src) == before and sorted(os.listdir(tmp_path)) == ["release"]
