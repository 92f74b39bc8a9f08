from setuptools import find_packages, setup

# ahead-of-time compilation for TPU from any host (vita-jax compile): the libtpu that jax 0.10.2 pins
TPU = ["libtpu==0.0.42.*"]
# vita-jax serve: the WebSocket server (websockets: one small pure-Python package, no web framework) and
# Silero VAD's weights as the silero-vad wheel ships them, read from its ONNX file with onnx (the wheel
# depends on torch, which pip installs but the server never imports); the tests use them too
SERVE = ["websockets>=13", "silero-vad>=5.1", "onnx>=1.16"]
# config.wandb: the run's scalars mirrored to Weights & Biases (vita_jax/train/loggers.py); the tests run it offline
WANDB = ["wandb>=0.19"]
# GPU attention (vita_jax/layers/flash.py): tokamax's flash kernels with segment starts, reached through its
# private modules (its public dot_product_attention takes no k_start), hence one pinned version; imported only
# when attention_impl resolves to "tokamax" (auto on GPU), so CPU/TPU installs do without it
GPU = ["tokamax==0.0.12"]

setup(
    name="vita_jax",
    version="0.1.0",
    description="VITA-1.5 (vision + speech in, text + speech out) in JAX/Flax: training on TPU/GPU, "
                "parity with and conversion to/from the official PyTorch release",
    # the project's top-level configs/ folder ships inside the package as vita_jax.configs (--config=stage2_2:tiny
    # finds it in an install)
    packages=find_packages(include=["vita_jax", "vita_jax.*"]) + ["vita_jax.configs"],
    package_dir={"vita_jax.configs": "configs"},
    # files the code reads beside its modules: the bundled speech clips, the web client
    package_data={"vita_jax": ["assets/speech/*", "serve/static/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        # LoRA / QLoRA (vita_jax/models/lora.py): Google's JAX quantization library, whose providers intercept flax
        # linen's dot_general (light: absl, opt_einsum beside jax and flax); pinned: QLoRA reaches its quantized
        # weight wrapper and per-layer quantizer in private modules
        "qwix==0.1.8",
        "orbax-checkpoint>=0.12",
        "etils[epath]>=1.5",  # vita_jax/paths.py: work dirs at object-storage URLs (orbax uses it too)
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9",
        "ml-collections>=1.1",
        "einops>=0.8",
        "sentencepiece>=0.2",
        "librosa>=0.10",
        "numpy>=1.26",
        "pillow>=10",
        "ml-dtypes>=0.5",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm",
        "tensorboardX>=2.6",
        "av>=12",
        "soundfile>=0.12",
        "pyyaml>=6",
        "scikit-image>=0.22",  # the demo's real photos ship inside its wheel
        "jiwer>=3.0",  # evals: word / character edit counts
        "whisper-normalizer>=0.1.12",  # evals: Whisper's English text normaliser for WER
    ],
    extras_require={
        # conversion from/to the official PyTorch files and parity tests against transformers
        "torch": ["torch==2.13.0", "transformers==4.57.6"],
        "tpu": TPU,
        "gpu": GPU,
        # the tests run the notebooks, the live server (nbclient + a kernel), the demo (scikit-image photos) and compile
        # for a TPU topology (libtpu)
        "dev": SERVE + ["pytest>=8", "pytest-xdist>=3", "ruff>=0.6", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6",
                        "matplotlib>=3.7"]
        + TPU + WANDB + GPU,
        "notebooks": ["jupyter", "nbclient", "matplotlib"],
        "serve": SERVE,
        "wandb": WANDB,
        # gs:// work dirs: etils.epath reaches Google Cloud Storage through fsspec's gcsfs
        "gcs": ["gcsfs"],
    },
    entry_points={"console_scripts": ["vita-jax=vita_jax.cli:main"]},
)
