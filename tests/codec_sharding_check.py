"""Run as a script (by test_train_codec_stage.py) so that 8 fake CPU devices exist before jax starts: the first two
steps of the tiny stage 3.1 run on a (data 2, fsdp 2, tensor 2) mesh against the one-device run of the same
config (its metrics.jsonl and step-2 checkpoint), so only the sharded program is compiled here."""
import json
import os
import sys

# fake CPU devices through jax's own setting, not XLA_FLAGS (whose flags enter every compilation cache key):
# the programs this process shares with one-device runs are then read from the session's cache
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from vita_jax import parallel  # noqa: E402
from vita_jax.train import run_checkpoint, stages  # noqa: E402
from vita_jax.train.codec import setup as codec_setup  # noqa: E402


def main(train, held, ref_dir):
    c = stages.stage_config("3.1", "tiny")
    c.data.train, c.data.heldout = train, held
    mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
    prog = codec_setup.program(c, mesh, lambda *a: None)
    state, step, data, mets = prog.state, prog.step, prog.data, []
    for _ in range(2):
        batch = prog.place(next(data))
        state, met = step(state, batch)
        mets.append({k: float(v) for k, v in jax.device_get(met).items()})
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(state)]
    out = dict(sharded_leaves=sum("fsdp" in s for s in specs), leaves=len(specs),
               batch_spec=str(batch["y"].sharding.spec))
    rows = [json.loads(line) for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
    ref_mets = [r for r in rows if "loss" in r][:2]
    # each loss term against max(|value|, 1): the tiny consistency term (1 − cos ≈ 2e-3) has no relative meaning
    for i, (m, r) in enumerate(zip(mets, ref_mets)):
        out[f"metric_err{i + 1}"] = max(abs(m[k] - r[k]) / max(abs(r[k]), 1.0) for k in r
                                        if k.startswith(("loss", "gen_", "disc_", "mel_", "compare")))
    ck = run_checkpoint.Checkpointer(os.path.join(ref_dir, "ckpt"))
    ref_state, _ = ck.restore(2, jax.device_get(state))
    ck.close()
    got = {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in
           jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}
    ref = {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in
           jax.tree_util.tree_flatten_with_path(jax.device_get(ref_state))[0]}
    out["same_keys"] = got.keys() == ref.keys()
    params = [k for k in got if k.startswith(("['gp']", "['dp']")) and got[k].size]
    n = sum(got[k].size for k in params)
    out["param_abs"] = max(float(np.abs(got[k] - ref[k]).max()) for k in params)
    half_lr = float(c.codec.learning_rate) / 2  # the fixture README's count: elements moved by more than lr / 2
    out["param_frac"] = sum(int(np.sum(np.abs(got[k] - ref[k]) > half_lr)) for k in params) / n
    out["lr"] = float(c.codec.learning_rate)
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3])
