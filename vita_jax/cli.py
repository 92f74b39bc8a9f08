"""``vita-jax`` command line: ``generate`` and ``bench`` (more sub-commands arrive with training)."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as e:
        raise SystemExit(f"--ids: expected integers separated by commas or spaces, got {text!r}") from e


def cmd_generate(a) -> int:
    import jax.numpy as jnp
    import vita_jax
    t0 = time.perf_counter()
    m = vita_jax.from_pretrained(a.path, dtype=jnp.dtype(a.dtype))
    print(f"loaded {a.path}: {len(m.keys_read)} tensors, {m.config.llm.num_hidden_layers} layers, "
          f"hidden {m.config.llm.hidden_size}, vocab {m.config.llm.vocab_size} ({time.perf_counter() - t0:.1f} s)")
    if a.prompt is not None:
        if m.tokenizer is None:
            raise SystemExit(f"{a.path} has no tokenizer.json: give the prompt as --ids")
        ids = m.tokenizer.encode(a.prompt)
    elif a.ids is not None:
        ids = _ids(a.ids)
    else:
        raise SystemExit("give --prompt TEXT or --ids 1,2,3")
    t0 = time.perf_counter()
    out = m.generate(np.asarray([ids]), max_new_tokens=a.max_new_tokens, do_sample=a.sample,
                     temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    dt = time.perf_counter() - t0
    new = [int(t) for t in out[0] if t >= 0]
    print("prompt ids:", ids)
    print("new ids:   ", new)
    if m.tokenizer is not None:
        print("text:      ", m.tokenizer.decode(new))
    print(f"{len(new)} tokens in {dt:.2f} s (compilation included)")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from vita_jax import bench
        return bench.main(argv[1:])
    p = argparse.ArgumentParser(prog="vita-jax", description="VITA-1.5 in JAX")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="continue a prompt with a release directory's LLM")
    g.add_argument("path", help="official-layout release directory (config.json + safetensors)")
    g.add_argument("--prompt", help="text prompt (needs tokenizer.json in the directory)")
    g.add_argument("--ids", help="prompt token ids, e.g. 501,11,10,79")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    sub.add_parser("bench", help="benchmarks: vita-jax bench llm --config=configs/FILE.py")
    a = p.parse_args(argv)
    return cmd_generate(a)


if __name__ == "__main__":
    sys.exit(main())
