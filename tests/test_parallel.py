"""Forward, generation and initialisation on 8 fake CPU devices, mesh (data 2, fsdp 2, tensor 2).

One subprocess makes every figure (``sharding_check.py``, ~75 s); the checks run as one test item, so that under
``-n 2`` one worker runs them while the other goes on with the suite (as separate items, the other worker waited
~80 s for the first one's subprocess). Every check runs and every failing one is reported."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HANG_S, XLA_BASE, once_per_session

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def result(tiny_dir, tmp_path_factory):
    def run():
        env = dict(os.environ)
        env["XLA_FLAGS"] = XLA_BASE  # the session's, without a device count of its own
        # without the session's compilation cache: the two runs that used it (and only they) errored in this fixture
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        p = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py"), tiny_dir],
                           capture_output=True, text=True, env=env, timeout=HANG_S)
        assert p.returncode == 0, p.stderr[-4000:]
        return json.loads(p.stdout.strip().splitlines()[-1])
    return once_per_session(tmp_path_factory, "sharding_check", run)


def _mesh(result):
    assert result["n_devices"] == 8
    assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert result["mesh_fill"] == {"data": 4, "fsdp": 1, "tensor": 2}


def _sharded_forward_equals_single_device(result):
    assert result["forward_rel_err"] <= 1e-5
    assert result["official_rel_err"] <= 1e-5
    assert result["generate_equal"]


def _parameters_really_sharded(result):
    specs = result["specs"]
    # q_proj kernel [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor
    assert specs["['llm']['model']['layers']['self_attn']['q_proj']['kernel']"] == \
        [None, "fsdp", "tensor"]
    assert specs["['llm']['model']['embed_tokens']['embedding']"] == ["tensor", "fsdp"]
    assert specs["['llm']['lm_head']['kernel']"] == ["fsdp", "tensor"]
    assert specs["['llm']['model']['layers']['mlp']['down_proj']['kernel']"] == \
        [None, "tensor", "fsdp"]
    L, E, H, D = result["q_global_shape"]
    assert result["q_shard_shape"] == [L, E // 2, H // 2, D]
    assert result["replicated_fraction"] < 0.02  # only the norm weights


def _sharded_init(result):
    assert result["init_embed_spec"] == ["tensor", "fsdp"]
    assert result["init_embed_shard_shape"] == [256, 32]


def _vision_sharded_over_data(result):
    assert result["pixels_spec"] == [["data", "fsdp"]]
    assert result["vision_rel_err"] <= 1e-5
    assert result["vision_official_rel_err"] <= 1e-5
    specs = result["specs"]
    assert specs["['vision_tower']['encoder']['layers']['attn']['qkv']['kernel']"] == [None, "fsdp", None, "tensor"]
    assert specs["['mm_projector']['0']['kernel']"] == ["tensor", "fsdp"]


def _audio_sharded(result):
    assert result["audio_rel_err"] <= 1e-5 and result["audio_lengths_equal"]
    assert result["specs"]["['audio_encoder']['encoder']['encoders']['self_attn']['linear_q']['kernel']"] == \
        [None, "fsdp", "tensor"]


def _train_step_on_mesh_equals_one_device(result):
    l1, l8 = result["step_loss"]
    assert abs(l1 - l8) <= 1e-5 * abs(l1)
    # updated parameters agree to 1e-5 absolute (weights are O(1)), every leaf but the key bias: its gradient
    # is exactly zero in exact arithmetic (a per-query constant under softmax), so Adam turns the float noise
    # of either reduction order into steps of up to lr; it may differ by at most that bound
    assert result["step_param_max_abs"] <= 1e-5, result["step_worst"]
    assert result["step_zero_grad_leaves"] == ["llm/model/layers/self_attn/k_proj/bias"]
    lr, steps = result["step_lr_steps"]
    assert result["step_zero_grad_max_abs"] <= 2 * lr * steps
    assert result["step_q_spec"] == [None, "fsdp", "tensor"]
    assert result["step_mu_spec"] == [None, "fsdp", "tensor"]  # Adam moments sharded like their parameter


def _checkpoint_restores_onto_another_mesh(result):
    assert result["restore_equal"]
    assert result["restore_mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert result["restore_spec"] == [None, "fsdp"]
    assert result["restore_data_state"] == {"next_index": 3}


CHECKS = (_mesh, _sharded_forward_equals_single_device, _parameters_really_sharded, _sharded_init,
          _vision_sharded_over_data, _audio_sharded, _train_step_on_mesh_equals_one_device,
          _checkpoint_restores_onto_another_mesh)


def test_eight_devices(result):
    failed = []
    for check in CHECKS:
        try:
            check(result)
        except AssertionError as e:
            failed.append(f"{check.__name__[1:]}: {e}")
    assert not failed, "\n".join(failed)
