"""Makes a TiCodec training variant for ``tests/test_train_codec_variants.py``: a tiny codec of other shapes than
``fixtures/ticodec-train``, trained two steps by the *official* ``train.py`` (imported from ``--ticodec``, a
checkout of y-ren16/TiCodec at 13af0eb; no upstream code is copied here), and the values the test compares.

    python tests/data/make_ticodec_variant.py --ticodec /tmp/ticodec --out tests/data/ticodec_variants/b

(on 2 shared cores: ~6 min for the three official runs, ~20 min for the kink term's reruns.)

Variant ``b``: upsample rates 8·5·4·2 (hop 320) with kernels 16/11/8/4, mel hop 256, segment 5120, batch 4,
eight clips of which two are shorter than the segment (upstream zero-pads them at the end and draws no crop).
Weights: PyTorch's default init drawn from ``--seed``; every tensor of >= 4096 elements (weight-norm ``weight_v``,
spectral-norm ``weight_orig``, the encoder's ``conv_post.weight``) is a strided view into one random buffer per
file (the fixture's storage trick, README §3.3), so ``g_`` / ``do_`` stay ~1-2 MB; codebooks get the scale of the
features they quantize. The run is repeated in float64 and with 1 thread: ``reference/tolerance.json`` holds, per
stored array, max|Δ| / max|ref| of each rerun (the official code's own spread, what the test's bounds are 3x of),
and ``kink``: what the official code's own near-kink LeakyReLU units can move each step-0 array (float32 reruns
with those units' slopes swapped, ``make_ticodec_variant_kinks.py``; the test adds it to 3x the spread).

Run-time shims (the venv has neither torchaudio nor tensorboard, and librosa 0.11 takes keywords only):
``torchaudio.transforms.Spectrogram`` as ``torch.stft`` / window L2 norm (bitwise equal, fixture README §9.1),
a recorder for ``SummaryWriter``, ``librosa.filters.mel`` called with keywords (checked against the fixture's
``mel_basis.npz``), and the CPU instead of ``cuda:0``.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_WAVS = os.path.join(HERE, "..", "..", "..", "shared", "fixtures", "ticodec-train", "wavs")

VARIANTS = {
    "b": dict(seed=2407, batch_size=4, segment_size=5120, upsample_rates=[8, 5, 4, 2],
              upsample_kernel_sizes=[16, 11, 8, 4], hop_size=256,
              # (source wav of the shared fixture, first sample, length): two shorter than the segment
              pieces=[("utt0.wav", 0, 12000), ("utt1.wav", 0, 13200), ("utt2.wav", 0, 3700), ("utt3.wav", 0, 11000),
                      ("utt4.wav", 0, 12000), ("utt5.wav", 0, 12500), ("utt2.wav", 6000, 4900),
                      ("utt3.wav", 2000, 7000)]),
}
BASE = {"resblock": "1", "num_gpus": 1, "learning_rate": 0.0002, "adam_b1": 0.5, "adam_b2": 0.9, "lr_decay": 0.98,
        "upsample_initial_channel": 256, "resblock_kernel_sizes": [3, 7],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]], "num_mels": 80, "num_freq": 513, "n_fft": 1024,
        "win_size": 1024, "sampling_rate": 24000, "n_code_groups": 1, "residul_layer": 1, "n_codes": 64,
        "codebook_loss_lambda": 1.0, "commitment_loss_lambda": 0.25, "global_code_num": 8,
        "global_feature_conv": [128, 16, 128, 3, 1], "fmin": 0, "fmax": 8000, "fmax_for_loss": None, "num_workers": 0}
NBUF = 262144


def model_json(name):
    v = VARIANTS[name]
    h = dict(BASE)
    h.update({k: v[k] for k in ("seed", "batch_size", "segment_size", "upsample_rates", "upsample_kernel_sizes",
                                "hop_size")})
    return h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticodec", required=True, help="checkout of y-ren16/TiCodec (13af0eb)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", default="b", choices=sorted(VARIANTS))
    ap.add_argument("--run", choices=("ref", "f64", "thread1"), help=argparse.SUPPRESS)  # internal: one run
    a = ap.parse_args()
    if a.run:
        from make_ticodec_variant_run import run_official  # beside this file; a process per run (dtype, threads)
        run_official(a.ticodec, a.out, a.run)
        return
    if not os.path.exists(os.path.join(a.out, "runs", "ref.npz")):
        make_inputs(a.out, a.variant, a.ticodec)
    for run in [r for r in ("ref", "f64", "thread1") if not os.path.exists(os.path.join(a.out, "runs", r + ".npz"))]:
        subprocess.run([sys.executable, __file__, "--ticodec", a.ticodec, "--out", a.out, "--run", run], check=True)
    from make_ticodec_variant_run import spread  # beside this file
    spread(a.out)
    from make_ticodec_variant_kinks import kinks  # beside this file
    kinks(a.ticodec, a.out)
    shutil.rmtree(os.path.join(a.out, "runs"))


def make_inputs(out, name, ticodec):
    """model.json, wavs, train.lst and the initial g_ / do_ files in ``out``."""
    import soundfile as sf
    os.makedirs(os.path.join(out, "wavs"), exist_ok=True)
    h = model_json(name)
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(h, f)
    lst = []
    for i, (src, start, n) in enumerate(VARIANTS[name]["pieces"]):
        x, sr = sf.read(os.path.join(SHARED_WAVS, src), dtype="float32")
        assert sr == 24000 and start + n <= len(x), (src, len(x))
        sf.write(os.path.join(out, "wavs", f"clip{i}.wav"), x[start:start + n], sr, subtype="FLOAT")
        lst.append(f"wavs/clip{i}.wav")
    with open(os.path.join(out, "train.lst"), "w") as f:
        f.write("\n".join(lst) + "\n")
    from make_ticodec_variant_run import init_checkpoint  # beside this file
    init_checkpoint(ticodec, out, h, NBUF)


def shims(ticodec):
    """torchaudio / tensorboard stand-ins and upstream on sys.path (see the module docstring)."""
    import torch
    ta = types.ModuleType("torchaudio")
    ta.transforms = types.ModuleType("torchaudio.transforms")

    class Spectrogram(torch.nn.Module):
        def __init__(self, n_fft, hop_length, win_length, window_fn, normalized, center, pad_mode, power):
            super().__init__()
            assert normalized is True and center is False and power is None
            self.n_fft, self.hop, self.win = n_fft, hop_length, win_length
            self.register_buffer("window", window_fn(win_length))

        def forward(self, x):
            shape = x.shape
            z = torch.stft(x.reshape(-1, shape[-1]), self.n_fft, self.hop, self.win, window=self.window,
                           center=False, normalized=False, onesided=True, return_complex=True)
            z = z.reshape(shape[:-1] + z.shape[-2:])
            return z / self.window.pow(2.0).sum().sqrt()

    ta.transforms.Spectrogram = Spectrogram
    ta.transforms.MelSpectrogram = None  # only reconstruction_loss uses it, never called
    sys.modules["torchaudio"], sys.modules["torchaudio.transforms"] = ta, ta.transforms
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.SummaryWriter = Recorder
    sys.modules["torch.utils.tensorboard"] = tb
    sys.path.insert(0, ticodec)


class Recorder:
    """SummaryWriter stand-in: keeps the scalars."""
    scalars = {}

    def __init__(self, *a, **k):
        pass

    def add_scalar(self, name, value, step):
        Recorder.scalars[f"{name}@{step}"] = float(value)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
