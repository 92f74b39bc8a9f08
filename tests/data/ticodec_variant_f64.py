"""Evidence for issue #24 item 2 (a diagnostic, not a test): vita_jax's codec debug step run in float64
(``jax_enable_x64``; the parameters, state and batches cast, no other change) against the official float64
rerun of a variant, step 0. Identical maths show as ~1e-14 relative on every array; a kink flip or a real
difference would not.

    python tests/data/make_ticodec_variant.py --ticodec /tmp/ticodec --out DIR --run f64   # -> DIR/runs/f64.npz
    python tests/data/ticodec_variant_f64.py DIR DIR/runs/f64.npz

(~10 GB and ~9 min on 2 cores.) The official float64 rerun keeps the mel front end in float32 (the dataset's
``FloatTensor`` and ``.float()`` filterbank, cast at entry: ``make_ticodec_variant_run.py``), so the mel-loss
terms and the G-update gradients behind them differ by float32 rounding there; vita_jax computes them in float64.
"""
import os
import sys

import jax
import numpy as np

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(folder, f64_npz):
    sys.path.insert(0, TESTS)
    import test_train_codec_variants as t

    from vita_jax.train.codec import files as codec_files
    load = codec_files.load_official

    def load_then_x64(*a):  # the templates are built with float32 initialisers, the step then runs in float64
        out = load(*a)
        jax.config.update("jax_enable_x64", True)
        return out
    codec_files.load_official = load_then_x64
    ref = {k: v for k, v in np.load(f64_npz).items() if k.startswith(("s0.", "u0."))}
    rows = sorted((e, n) for n, e in t.compared(ref, t.ours(folder, np.float64, steps=1)))
    for e, n in rows[-15:]:
        print(f"{n}: {e:.2e}")
    print(f"{len(rows)} arrays, median {np.median([e for e, _ in rows]):.1e}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
