"""``config.profile_steps``: checked before anything runs, and a tiny run writes a profiler trace of its window."""
import glob
import os

import pytest

from vita_jax.train import profiling


def test_parse():
    assert profiling.parse("") is None and profiling.parse(None) is None
    assert profiling.parse("10:15") == (10, 15) and profiling.parse(" 3 : 3 ") == (3, 3)


@pytest.mark.parametrize("bad", ["10", "5:2", "0:3", "a:b", "1:2:3", "-1:2"])
def test_bad_value_is_one_line_naming_the_field_before_anything_runs(tmp_path, bad):
    from vita_jax.train import stages, trainer
    c = stages.stage_config("1.1", "tiny")
    c.profile_steps = bad
    with pytest.raises(ValueError, match=r"^config.profile_steps = .*: must be 'FIRST:LAST'") as e:
        trainer.train(c, str(tmp_path / "wd"), log=lambda *_: None, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow  # a tiny run (~40 s)
def test_tiny_run_writes_a_trace_of_its_window(tmp_path):
    from vita_jax.train import stages, trainer
    c = stages.stage_config("1.1", "tiny")
    c.total_steps, c.checkpoint_every, c.profile_steps = 3, 100, "1:2"
    lines = []
    trainer.train(c, str(tmp_path), log=lines.append, progress=False)
    traces = glob.glob(os.path.join(tmp_path, "profile", "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert f"profile of steps 1:2 written to {os.path.join(tmp_path, 'profile')}" in lines
