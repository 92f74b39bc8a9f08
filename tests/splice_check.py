"""Run as a script (by tests/test_models_splice.py) on 8 fake CPU devices.

1. The splice on meshes of 2 and of 8 devices, one batch row and its media per device: the shard-local splice
   (models/splice.py) against the global gather, and the bytes each compiled program moves between devices.
2. One stage-1.2 :tiny train step on a data=8 mesh with the pipeline's per-shard batch (the shard-local splice)
   against the same batch on one device.

Prints ``RESULT {json}``: per mesh (2 and 8 devices on ``data``; data 2 x fsdp 2 x tensor 2) ``err`` (local
vs global, max abs), ``local_bytes`` / ``global_bytes`` (bytes of every collective's result in the compiled HLO,
per device); the step's ``media_local`` (the pipeline's batch lays media out per shard), ``step_marked`` (the step
took the local splice), ``step_loss`` (one device, eight)."""
import json
import os
import re

# fake CPU devices through jax's own setting, not XLA_FLAGS (whose flags enter every compilation cache key):
# the programs this process shares with one-device runs are then read from the session's cache
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vita_jax import parallel  # noqa: E402
from vita_jax.models import splice  # noqa: E402

TPT, TILES, E, L = 4, 2, 32, 24  # rows per tile, tiles per row (= per shard), embed, positions per row
GROUPS = [(1, 3), (2, 5)]  # clip groups: (slots per shard, rows per slot)


def batch(rng, N):
    """One row per shard: text, then its two tiles, then its clips (one per group slot), then padding."""
    kind = np.zeros((N, L), np.int32)
    src = np.zeros((N, L), np.int32)
    for r in range(N):
        at = 2
        for t in range(TILES):  # this row's tiles: global tiles r*TILES + t (its shard's block)
            kind[r, at:at + TPT], src[r, at:at + TPT] = splice.IMAGE, (r * TILES + t) * TPT + np.arange(TPT)
            at += TPT
        base = 0
        for slots, per in GROUPS:
            for j in range(slots):  # global slot r*slots + j of the group (its shard's block)
                n = per - 1  # a clip shorter than its slot
                kind[r, at:at + n], src[r, at:at + n] = splice.AUDIO, base + (r * slots + j) * per + np.arange(n)
                at += n
            base += slots * N * per
        kind[r, at + 1:] = splice.PAD
    x = rng.standard_normal((N, L, E)).astype(np.float32)
    img = rng.standard_normal((N * TILES, TPT, E)).astype(np.float32)
    aud = [rng.standard_normal((N * s, p, E)).astype(np.float32) for s, p in GROUPS]
    return x, kind, src, img, aud


def collective_bytes(hlo: str) -> int:
    """Bytes of the results of every collective in optimized HLO text (one device's program)."""
    total = 0
    for m in re.finditer(r"= ([a-z0-9]+)\[([0-9,]*)\][^ ]* (all-gather|all-to-all|collective-permute|all-reduce|"
                         r"reduce-scatter)(-start)?\(", hlo):
        dtype, dims = m.group(1), [int(d) for d in m.group(2).split(",") if d]
        bits = 8 if dtype == "pred" else int(re.sub(r"[a-z]", "", dtype) or 32)  # f32, s32, bf16, u8, ...
        total += int(np.prod(dims)) * bits // 8
    return total


def splice_on(N: int, mesh_shape=None) -> dict:
    """``N`` rows, one per batch shard: on ``data=N`` over the first N devices, or on ``mesh_shape``."""
    mesh = parallel.make_mesh(mesh_shape or {"data": N}, devices=None if mesh_shape else jax.devices()[:N])
    x, kind, src, img, aud = batch(np.random.default_rng(0), N)
    ref = splice.splice_global(jnp.asarray(x), kind, src, [img], aud)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    args = jax.device_put((x, kind, src, [img], aud), sh)
    out, hlo = {}, {}
    for name, local in (("local", True), ("global", False)):
        with parallel.use_mesh(mesh), parallel.use_local_media(local):
            assert splice.can_splice_locally(x, [img], aud) == local
            f = jax.jit(splice.splice_local if local else splice.splice_global)
            compiled = f.lower(*args).compile()
            out[name], hlo[name] = compiled(*args), compiled.as_text()
    return dict(err=float(np.abs(np.asarray(out["local"]) - np.asarray(ref)).max()),
                err_global=float(np.abs(np.asarray(out["global"]) - np.asarray(ref)).max()),
                local_bytes=collective_bytes(hlo["local"]), global_bytes=collective_bytes(hlo["global"]))


def train_step() -> dict:
    """Stage 1.2 :tiny (ViT + projector + LLM trained) with its synthetic data on a data=8 mesh."""
    from vita_jax.data import shards, synthetic
    from vita_jax.models import vita
    from vita_jax.train import program, setup, stages
    c = stages.stage_config("1.2", "tiny")
    c.batch_size, c.mesh_shape = 8, dict(data=8, fsdp=1, tensor=1)
    c.optim.update(lr=1e-3, schedule="constant")
    data, _ = synthetic.synthetic_data(c)
    host = next(iter(data))
    params = program.initial_params(c)
    s1, step1, _ = setup.build(c, params, total_steps=10)
    s8, step8, info8 = setup.build(c, params, mesh=parallel.make_mesh(dict(c.mesh_shape)), total_steps=10)
    tpt = vita.vision_config(c).tokens_per_tile
    # the same batch with its tiles in reverse order (src follows them): the same loss, but row r's tile now
    # sits in another shard's slot, so this one must take the global gather (its own program, same shapes)
    rev, n = dict(host), len(host["pixels"])
    rev["pixels"] = np.ascontiguousarray(host["pixels"][::-1])
    img = host["kind"] == vita.IMAGE
    rev["src"] = np.where(img, (n - 1 - host["src"] // tpt) * tpt + host["src"] % tpt, host["src"]).astype(np.int32)
    placed, placed_rev = info8["place"](host), info8["place"](rev)
    s8_copy = jax.tree.map(jnp.copy, s8)  # the step donates its state
    _, m1 = step1(s1, jax.tree.map(jnp.asarray, host))
    _, m8 = step8(s8, placed)
    _, m8_rev = step8(s8_copy, placed_rev)
    return dict(media_local=shards.media_local(host, 8, tpt), step_marked=setup.LOCAL_MEDIA in placed,
                rev_local=shards.media_local(rev, 8, tpt), rev_marked=setup.LOCAL_MEDIA in placed_rev,
                tiles=n, step_loss=[float(m1["loss"]), float(m8["loss"]), float(m8_rev["loss"])])


def main():
    out = {str(n): splice_on(n) for n in (2, 8)}
    out["data2_fsdp2_tensor2"] = splice_on(4, dict(data=2, fsdp=2, tensor=2))  # the batch over two axes
    out["step"] = train_step()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
