"""``--dtype auto``: bfloat16 on an accelerator, float32 on CPU; printed at start-up."""
from unittest import mock

from vita_jax import parallel
from vita_jax.cli_args import parser


def test_auto_dtype_follows_the_platform():
    assert parallel.resolve_dtype("bfloat16") == "bfloat16" and parallel.resolve_dtype("float32") == "float32"
    assert parallel.resolve_dtype("auto") == "float32"  # the tests run on CPU
    for backend in ("gpu", "tpu"):
        with mock.patch("jax.default_backend", return_value=backend):
            assert parallel.resolve_dtype("auto") == "bfloat16"
    for cmd in (["generate", "DIR"], ["serve", "--checkpoint", "DIR"], ["eval", "--checkpoint", "D", "--out", "O"]):
        assert parser().parse_known_args(cmd)[0].dtype == "auto", cmd
