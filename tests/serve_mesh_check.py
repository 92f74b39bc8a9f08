"""Run in a subprocess by tests/test_serve_mesh.py: the fixture release on one CPU device and on a (fsdp 4,
tensor 2) mesh of 8, through forward, generate and the serve engine; prints ``RESULT {json}``."""
import os
import sys

# fake CPU devices through jax's own setting, not XLA_FLAGS (whose flags enter every compilation cache key):
# the programs this process shares with one-device runs are then read from the session's cache
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402

import vita_jax  # noqa: E402
from vita_jax import parallel  # noqa: E402
from vita_jax.cli import parse_mesh  # noqa: E402
from vita_jax.serve import engine as engine_lib  # noqa: E402


def served(m, ids):
    e = engine_lib.ServeEngine(m, slots=2, max_new_tokens=8, max_prompt=64)
    try:
        got, done = [[], []], [threading.Event(), threading.Event()]
        for i in range(2):  # two concurrent turns (one row each)
            e.submit(engine_lib.Request(lambda: (ids, None, []), got[i].append, lambda r, info, i=i: done[i].set(),
                                        max_new_tokens=8))
        assert all(d.wait(600) for d in done)
        return got
    finally:
        e.close()


def prompts(m, tiny):
    """The server's prompt path (serve/prompt.py) after its warm-up: three image tiles with one clip, then with two
    (a spoken history turn) -> (compilations after the warm-up, the embeddings of the real positions)."""
    from vita_jax.infer import compiles
    from vita_jax.serve.prompt import PromptShapes
    f = np.load(os.path.join(tiny, "reference", "forward.npz"))
    ids = f["input_ids"][0]
    clips = [f["audio_feats"][k, :n] for k, n in enumerate(f["audio_lengths"])]
    tiles = np.random.default_rng(0).integers(0, 256, (3, 3, 56, 56), dtype=np.uint8)  # what the server sends
    shapes = PromptShapes(m, max_prompt=128, max_tiles=3)  # the three tiles below; a short ladder (compile time)
    compiles.count()
    shapes.warmup()
    c0, out = compiles.count(), []
    for ids_k, clips_k in ((ids, clips[:1]), (np.concatenate([ids[:13], [-500], ids[13:]]), clips)):
        x, mask = shapes.embeds(ids_k, tiles, clips_k)
        out.append(np.asarray(x)[0, :int(np.asarray(mask).sum())])
    return compiles.count() - c0, out


def main(tiny):
    ids = np.load(os.path.join(tiny, "reference", "forward_textonly.npz"))["input_ids"]
    one = vita_jax.from_pretrained(tiny)
    mesh = parallel.make_mesh(parse_mesh("fsdp=4,tensor=2"))
    many = vita_jax.from_pretrained(tiny, mesh=mesh)
    f1, f8 = np.asarray(one.forward(ids)), np.asarray(many.forward(ids))
    g1 = one.generate(ids, max_new_tokens=8, stop_ids=[])
    g8 = many.generate(ids, max_new_tokens=8, stop_ids=[])
    kernel = many.params["llm"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    r = dict(devices=len(mesh.devices.flat), rel_err=float(np.abs(f1 - f8).max() / np.abs(f1).max()),
             generate_equal=bool(np.array_equal(g1, g8)), served_one=served(one, ids[0]),
             served_mesh=served(many, ids[0]), q_spec=[str(s) for s in kernel.sharding.spec],
             generated=[int(t) for t in g1[0] if t >= 0 and t not in one.stop_ids])
    (c1, p1), (c8, p8) = prompts(one, tiny), prompts(many, tiny)
    r.update(prompt_compiles=[c1, c8], prompt_positions=[len(p) for p in p1],
             prompt_rel_err=max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(p1, p8)))
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
