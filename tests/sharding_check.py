"""Run as a script (by test_parallel.py) so that 8 fake CPU devices exist before jax starts."""
import json
import os
import sys

# fake CPU devices through jax's own setting, not XLA_FLAGS (whose flags enter every compilation cache key):
# the programs this process shares with one-device runs are then read from the session's cache
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import vita_jax  # noqa: E402
from vita_jax import api, parallel  # noqa: E402
from vita_jax.models import qwen2  # noqa: E402


def spec(x):
    """PartitionSpec as a JSON list (tuples for multi-axis entries become lists)."""
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]


def main(tiny):
    out = {"n_devices": jax.device_count()}
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    out["mesh"] = dict(mesh.shape)
    out["mesh_fill"] = dict(parallel.make_mesh(dict(data=-1, fsdp=1, tensor=2)).shape)

    ref = np.load(os.path.join(tiny, "reference/forward_textonly.npz"))
    ids = np.concatenate([ref["input_ids"], ref["input_ids"][:, ::-1]], 0)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    m1 = vita_jax.from_pretrained(tiny)
    m8 = vita_jax.from_pretrained(tiny, mesh=mesh)
    a, b = m1.forward(ids, mask), m8.forward(ids, mask)
    out["forward_rel_err"] = float(np.abs(a - b).max() / np.abs(a).max())
    out["official_rel_err"] = float(np.abs(b[0] - ref["logits_plain"][0]).max() / np.abs(ref["logits_plain"]).max())

    leaves = jax.tree_util.tree_flatten_with_path(m8.params)[0]
    out["specs"] = {jax.tree_util.keystr(p): spec(x) for p, x in leaves}
    q = m8.params["llm"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    out["q_global_shape"] = list(q.shape)
    out["q_shard_shape"] = list(q.addressable_shards[0].data.shape)
    total = sum(x.size for _, x in leaves)
    replicated = sum(x.size for _, x in leaves if x.sharding.is_fully_replicated)
    out["replicated_fraction"] = replicated / total

    g1 = m1.generate(ids[:, :12], max_new_tokens=6, stop_ids=[])
    g8 = m8.generate(ids[:, :12], max_new_tokens=6, stop_ids=[])
    out["generate_equal"] = bool(np.array_equal(g1, g8))

    vis = np.load(os.path.join(tiny, "reference/vision.npz"))
    pixels = np.concatenate([vis["pixel_values"], vis["pixel_values"][:1]])  # 4 tiles
    e1, e8 = m1.encode_images(pixels), m8.encode_images(pixels)
    out["vision_rel_err"] = float(np.abs(e1 - e8).max() / np.abs(e1).max())
    out["vision_official_rel_err"] = float(np.abs(e8[:3] - vis["projector_out"]).max()
                                           / np.abs(vis["projector_out"]).max())
    placed = m8._place(pixels)
    out["pixels_spec"] = spec(placed)

    aud = np.load(os.path.join(tiny, "reference/audio.npz"))
    a1, n1 = m1.encode_audio(aud["batch_fbank"], aud["batch_lengths"])
    a8, n8 = m8.encode_audio(aud["batch_fbank"], aud["batch_lengths"])
    out["audio_rel_err"] = float(np.abs(a1 - a8).max() / np.abs(a1).max())
    out["audio_lengths_equal"] = bool(np.array_equal(n1, n8))

    # one train step of stage 1.2 (ViT + projector + LLM trainable) on the mesh vs one device
    from vita_jax.train import setup, stages
    f = np.load(os.path.join(tiny, "reference/forward.npz"))
    plan, a = m1._prepare(f["input_ids"], f["attention_mask"], f["labels"], f["images"][:3], f["audio_feats"],
                          f["audio_lengths"])
    batch = dict(kind=np.asarray(a[0]), text_ids=np.asarray(a[1]), src=np.asarray(a[2]), pixels=np.asarray(a[3]),
                 audio_feats=np.asarray(a[4]), audio_lens=np.asarray(a[5]), labels=plan.labels)
    c = stages.stage_config("1.2", "tiny")
    c.llm.update(m1.config.llm.to_dict())
    c.vision.update(m1.config.vision.to_dict())
    c.audio.update(m1.config.audio.to_dict())
    c.mm_hidden_size = m1.config.mm_hidden_size
    c.optim.update(lr=1e-3, schedule="constant")
    s1, step1, _ = setup.build(c, m1.params, total_steps=10)
    s8, step8, info8 = setup.build(c, m8.params, mesh=mesh, total_steps=10)
    for _ in range(2):
        s1, met1 = step1(s1, jax.tree.map(jax.numpy.asarray, batch))
        s8, met8 = step8(s8, batch)
    out["step_loss"] = [float(met1["loss"]), float(met8["loss"])]
    out["step_param_max_rel"] = max(float(np.abs(np.asarray(s1.train[k]) - np.asarray(s8.train[k])).max()
                                          / max(np.abs(np.asarray(s1.train[k])).max(), 1e-12)) for k in s1.train)
    diffs = {k: (float(np.abs(np.asarray(s1.train[k]) - np.asarray(s8.train[k])).max()),
                 float(np.abs(np.asarray(s1.train[k])).max())) for k in s1.train}
    # the key bias's exact gradient is zero (q.b_k is one constant per query row, which softmax removes), so
    # its float gradient is pure reduction-order noise that Adam divides by ~eps: it is compared apart, against
    # Adam's bound on what noise can move it (lr per step); every other leaf is held to 1e-5
    zero_grad = {k for k in diffs if k.endswith("self_attn/k_proj/bias")}
    rest = {k: v for k, v in diffs.items() if k not in zero_grad}
    worst = max(rest, key=lambda k: rest[k][0] / max(rest[k][1], 1e-12))
    out["step_worst"] = [worst, *rest[worst]]
    out["step_param_max_abs"] = max(d for d, _ in rest.values())
    out["step_zero_grad_leaves"] = sorted(zero_grad)
    out["step_zero_grad_max_abs"] = max(diffs[k][0] for k in zero_grad)
    out["step_lr_steps"] = [1e-3, 2]
    q8 = s8.train["llm/model/layers/self_attn/q_proj/kernel"]
    out["step_q_spec"] = spec(q8)
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(s8.opt_state)[0]
          if any(getattr(k, "key", None) == "llm/model/layers/self_attn/q_proj/kernel" for k in p)]
    out["step_mu_spec"] = spec(mu[0])

    # a checkpoint saved on mesh (fsdp 8) restores onto mesh (data 2, fsdp 4) with the same values
    import tempfile

    from vita_jax.train.run_checkpoint import Checkpointer
    mesh_a = parallel.make_mesh(dict(data=1, fsdp=8, tensor=1))
    mesh_b = parallel.make_mesh(dict(data=2, fsdp=4, tensor=1))
    sa, run_a, _ = setup.build(c, m1.params, mesh=mesh_a, total_steps=10)
    sa, _ = run_a(sa, batch)
    d = tempfile.mkdtemp()
    ck = Checkpointer(d, every=1)
    ck.save(1, sa, {"next_index": 3}, force=True)
    ck.wait()
    sb, _, _ = setup.build(c, m1.params, mesh=mesh_b, total_steps=10)
    rb, data_state = ck.restore(1, sb)
    ck.close()
    key = "llm/model/layers/mlp/up_proj/kernel"
    out["restore_equal"] = all(np.array_equal(np.asarray(sa.train[k]), np.asarray(rb.train[k])) for k in sa.train) and \
        all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(sa.opt_state),
                                                                         jax.tree.leaves(rb.opt_state)))
    out["restore_mesh"] = dict(rb.train[key].sharding.mesh.shape)
    out["restore_spec"] = spec(rb.train[key])
    out["restore_data_state"] = data_state

    module = qwen2.Qwen2ForCausalLM(m8.llm_cfg)
    params = api.init_params(module, mesh)
    emb = params["model"]["embed_tokens"]["embedding"]
    out["init_embed_spec"] = spec(emb)
    out["init_embed_shard_shape"] = list(emb.addressable_shards[0].data.shape)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
