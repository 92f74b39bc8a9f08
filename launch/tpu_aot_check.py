"""Ahead-of-time check, on any host with ``libtpu`` installed (no TPU needed), that a small Qwen2
training step with ``attention_impl="auto"`` compiles for a TPU topology and that the attention
runs in the splash (Mosaic) kernel: the compiled HLO must hold ``tpu_custom_call`` ops named
after the splash kernels, forward and backward. Not a CI test (libtpu is optional)::

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python launch/tpu_aot_check.py [--topology v5p:2x2x1]
"""
from __future__ import annotations

import argparse
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import topologies

from vita_jax import parallel
from vita_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)

    devices = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices
    mesh = parallel.make_mesh({"fsdp": len(devices) // 2, "tensor": 2}, devices=devices)
    cfg = Qwen2Config(vocab_size=1024, hidden_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=1024, dtype=jnp.bfloat16,
                      remat_policy="dots_no_batch", attention_impl="auto")  # head_dim 128, GQA
    model = Qwen2ForCausalLM(cfg)
    b, t = args.batch, args.seq_len
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=parallel.data_sharding(mesh, 2, shape=(b, t)))
    with parallel.use_mesh(mesh):
        abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
        shardings = parallel.param_shardings(abstract, mesh)
        params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              nn.unbox(abstract), shardings)["params"]

        def loss(params, ids, segment_ids, positions):  # a packed batch: segment ids + restarting positions
            logits, _ = model.apply({"params": params}, ids, (segment_ids > 0).astype(jnp.int32), positions,
                                    segment_ids=segment_ids)
            return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1))

        step = jax.jit(jax.value_and_grad(loss))
        hlo = step.lower(params, ids, ids, ids).compile().as_text()
        # an unpacked, right-padded forward (no segment ids: the padding mask becomes kernel ids)
        fwd = jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask)[0])
        hlo_unpacked = fwd.lower(params, ids, ids).compile().as_text()
    print(f"topology {args.topology}: {len(devices)} devices {devices[0].device_kind}; mesh {dict(mesh.shape)}")
    ok = True
    for name, text, want in (("packed train step", hlo, ("fwd", "dq", "dkv")),
                             ("unpacked forward", hlo_unpacked, ("fwd",))):
        calls = len(re.findall(r'custom_call_target="tpu_custom_call"', text))
        names = sorted(set(re.findall(r"splash_mha_[a-z_]+", text)))
        found = all(any(f"_{w}_" in n for n in names) for w in want)
        print(f"{name}: {calls} tpu_custom_call ops; kernels {names}; {'OK' if found else 'MISSING ' + str(want)}")
        ok &= found and calls > 0
    print("OK: splash kernels in the compiled TPU programs" if ok else "FAIL: no splash kernel found")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
