import os
import subprocess
import sys

# the tests run on CPU; with libtpu installed (the dev extra, for `vita-jax compile`) JAX would otherwise probe
# for a TPU in every process (and the subprocesses inherit this); compiling for a TPU topology still works
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest


def _collective_timeout_flag() -> str:
    """XLA_FLAGS for every test process: XLA's CPU collectives abort a program when one device's thread is 40 s
    late at a rendezvous, which an 8-device test on 2 busy cores can be (test_parallel's 8-device run aborted so
    once beside another worker's work); 600 s only guards against a hang. Only where this jaxlib knows the flag
    (XLA refuses unknown XLA_FLAGS, and setup.py does not pin jaxlib)."""
    import importlib.util
    import mmap
    flag = "xla_cpu_collective_call_terminate_timeout_seconds"
    spec = importlib.util.find_spec("jaxlib")
    lib = os.path.join(list(spec.submodule_search_locations)[0], "libjax_common.so") if spec else ""
    try:
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return f"--{flag}=600" if m.find(flag.encode()) >= 0 else ""
    except (OSError, ValueError):
        return ""


# the session's XLA_FLAGS (see above): tests that give a subprocess its own XLA_FLAGS start from this
XLA_BASE = _collective_timeout_flag()
if XLA_BASE and XLA_BASE.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_BASE).strip()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("VITA_SHARED", os.path.join(os.path.dirname(REPO), "shared"))
FIXTURES = os.path.join(SHARED, "fixtures")
TINY = os.path.join(FIXTURES, "vita15-tiny")
# every subprocess and wait of the suite is bounded by this: a guard against hangs only, never a verdict on
# speed (the slowest guarded run, the demo, takes ~10 min on an idle 2-core machine and ~2x that beside a
# CPU-heavy process)
HANG_S = 3600
QWEN_TOK = os.path.join(FIXTURES, "qwen2.5-tokenizer")  # the real Qwen2.5 tokenizer (vita15-tiny has no tokenizer.json)
VITA_JAX = [sys.executable, "-m", "vita_jax.cli"]  # `vita-jax` in a subprocess, from this checkout


def run_cli(*args, timeout=HANG_S, **kw):
    """``vita-jax ARGS`` in a subprocess run from the checkout, its output captured as text, bounded by HANG_S
    (``kw``: ``env`` and other ``subprocess.run`` options)."""
    return subprocess.run([*VITA_JAX, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def cli_error(capsys, *args):
    """``vita-jax ARGS`` in this process must fail as a user mistake: exit code 2, no traceback, exactly one
    stderr line ``vita-jax: error: ...`` (returned)."""
    from vita_jax import cli
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vita-jax: error: "), err
    return lines[0]


def one_line(exc_info, *names):
    """The message of a ``pytest.raises`` error is one line naming each of ``names`` (returned)."""
    msg = str(exc_info.value)
    assert "\n" not in msg and all(n in msg for n in names), msg
    return msg


def file_tree(root):
    """Every file under ``root`` with its size, sorted: equal before and after means nothing was moved, deleted
    or written."""
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs)


def rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def tiny_dir():
    assert os.path.isdir(TINY), f"fixtures not found at {TINY} (set VITA_SHARED)"
    return TINY


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """The fixture checkpoint loaded once for the whole session (tests must not mutate it
    without restoring)."""
    import vita_jax
    return vita_jax.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def hf_qwen2(tmp_path_factory):
    """A random tiny transformers Qwen2ForCausalLM saved by transformers (safetensors) to a tmp dir.
    Weights are drawn with std 0.2 (not 0.02) so greedy choices have clear margins."""
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=512,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.6, 1.4)
            else:
                p.normal_(0.0, 0.2)
    d = str(tmp_path_factory.mktemp("hf_qwen2"))
    model.save_pretrained(d, safe_serialization=True)
    return model, d


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer (``QWEN_TOK``), loaded once for the session."""
    from vita_jax.data.text import load_tokenizer
    return load_tokenizer(QWEN_TOK)


@pytest.fixture(scope="session")
def tts_dir(tiny_dir):
    return os.path.join(tiny_dir, "vita_tts_ckpt")


@pytest.fixture(scope="session")
def speech(tts_dir):
    from vita_jax.infer.speech import load_speech
    return load_speech(tts_dir)


def tts_ref(tts_dir, name):
    return np.load(os.path.join(tts_dir, "reference", name + ".npz"))


def write_video(path, n_frames, fps, size=(64, 48), step=9):
    """A small mpeg4 file whose frame i is uniformly grey (i * step) % 256."""
    import av
    import numpy as np
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n_frames):
            frame = np.full((size[1], size[0], 3), (i * step) % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)


@pytest.fixture(scope="session")
def chat_release_dir(tmp_path_factory):
    """A random tiny VITA with the real Qwen2.5 tokenizer (full 152064-row vocabulary) and the
    fixture's speech decoder + codec, written in the official release layout."""
    from vita_jax.bench.serve import tiny_release
    return tiny_release(str(tmp_path_factory.mktemp("rel") / "vita-tiny-random"), FIXTURES)


def demo_mixture(root, n: int, n_text: int | None = None) -> tuple[list, str, int]:
    """Official files of the demo's kinds under ``root`` (captions with photos, spoken questions
    about an image, text): ``(json paths, tokenizer dir, vocabulary size rounded up to 64)``."""
    import json

    import vita_jax.demo.data as demo_data  # the demo's writer: imported by the tests that use it
    d = demo_data.DemoData(str(root), demo_data.Speech("recordings"), n_train=n)
    files = [d.captions("train", n), d.spoken_vqa("train", n), d.text_qa("train", n if n_text is None else n_text)]
    texts = [m["value"].replace("<image>", " ").replace("<audio>", " ") for f in files for s in json.load(open(f))
             for m in s["conversations"]]
    tok = os.path.join(str(root), "tok")
    return files, tok, demo_tokenizer(texts, tok)


def demo_tokenizer(texts, tok: str) -> int:
    """The demo's word-level tokenizer over ``texts`` and the demo's replies, written to ``tok``: its
    vocabulary size rounded up to 64 (a tiny model's ``config.llm.vocab_size``)."""
    import vita_jax.demo.data as demo_data
    from vita_jax.data.text import TextTokenizer
    from vita_jax.sizes import round_up
    demo_data.build_tokenizer(list(texts) + demo_data.reply_texts(), tok)
    return round_up(len(TextTokenizer.from_file(tok)), 64)



@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_module():
    """After each test module: JAX's compiled programs and traces dropped, garbage collected, freed heap returned
    to the OS. A worker otherwise keeps every program it compiled (4+ GB by the end of the suite), and two
    workers plus a test's training subprocess share the machine's 24 GB."""
    yield
    import ctypes
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# the suite's longest items (minutes each on 2 cores), started first under -n 2 so that no worker picks one up near
# the end while the other has run dry. xdist hands each worker two items first, then two more each time its queue
# runs down to one (pytest_configure): worker 0 takes the official codec steps and the demo, worker 1 stage 3.1 and
# the two-process run; the :narrow module's two items go next to worker 0 (done first with the official steps), which
# runs them after the demo. The three holding `big_memory` never overlap, and none of them waits for the lock: the
# :narrow runs placed after stage 3.1 on worker 1 waited ~70 s for the demo's (2026-12-07)
LONG_FIRST = ("test_train_codec.py::test_official_steps", "test_demo_run.py::", "test_train_codec_stage.py::",
              "test_parallel_multiprocess.py::test_two_processes_equal_one", "test_train_stages_narrow.py::")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.nodeid.rsplit("/", 1)[-1]
        return next((i for i, p in enumerate(LONG_FIRST) if name.startswith(p)), len(LONG_FIRST))
    items.sort(key=rank)  # stable: the rest as collected


def _session_folder(tmp_path_factory):
    """The session's temporary folder, which every xdist worker shares (a plain run: its own)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-USER/pytest-N/popen-gwK -> the session's folder
    return root


def once_per_session(tmp_path_factory, name: str, make):
    """``make()``'s JSON result, made by the first xdist worker that asks and read by the others: a module fixture
    runs once per worker that runs one of the module's tests (under -n 2 usually both). A failed ``make`` writes
    nothing (the next caller fails on its own)."""
    import fcntl
    import json
    root = _session_folder(tmp_path_factory)
    path = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if not path.exists():
                path.write_text(json.dumps(make()))
            return json.loads(path.read_text())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def big_memory(tmp_path_factory):
    """Held for a whole module by the fixtures of the suite's biggest runs (test_train_codec's official steps,
    test_train_stages_narrow's :narrow runs, the demo: ~8-12 GB each with their worker), so that under -n 2 no two
    of them share the 24 GB machine: an exclusive lock on a file in the session's temporary folder."""
    import fcntl
    with open(_session_folder(tmp_path_factory) / "big_memory.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _session_compilation_cache(config) -> None:
    """One persistent XLA compilation cache for the whole session, shared by the xdist workers and inherited by
    every subprocess (the environment): the suite's CLI runs compile the same tiny steps again and again. A folder
    of the system's temp dir named after xdist's run id (a plain run: its own), removed by the controller at the end.
    A cache the caller set is left alone."""
    import tempfile
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"solo-{os.getpid()}"
    path = os.path.join(tempfile.gettempdir(), f"vita_jax-tests-xla-cache-{run}")
    os.makedirs(path, exist_ok=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    try:  # a size limit makes jax take a file lock around each entry: two workers may write the same key at once
        import filelock  # noqa: F401
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(16 << 30)
    except ImportError:
        pass
    if not hasattr(config, "workerinput"):
        config._vita_cache_dir = path


def pytest_unconfigure(config):
    path = getattr(config, "_vita_cache_dir", None)
    if path:
        import shutil
        shutil.rmtree(path, ignore_errors=True)


def pytest_configure(config):
    _session_compilation_cache(config)
    config.addinivalue_line("markers", "slow: takes minutes (training runs, subprocesses, the demo); the quick loop is "
                                       "pytest -m \"not slow\" (README's command runs everything)")
    # qwix 0.1.8 (LoRA) checks for flax's removed nnx.VariableState alias on every intercepted call: its
    # deprecation, not ours (vita_jax/models/lora.py filters it the same way outside pytest)
    config.addinivalue_line("filterwarnings", "ignore:'VariableState' was removed:DeprecationWarning")
    # under -n N, xdist's first hand-out would give each worker a quarter of its share in one contiguous chunk (all of
    # LONG_FIRST to one worker); two items at a time keeps them apart and the workers evenly fed
    if getattr(config.option, "dist", "no") == "load" and getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 2


def jaxpr_avals(jaxpr):
    """Every value (inputs and outputs of every equation) of a jaxpr and of the jaxprs inside it."""
    from jax.extend import core as jex_core
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for v in jaxpr.invars:
        yield v.aval
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                    yield from jaxpr_avals(sub)


def make_example(rng, i, vocab, size, tiles=0, clips=(), text=20):
    """A training example (the data pipeline's form) with ``tiles`` image tiles and fbank ``clips`` (frames each)."""
    from vita_jax.models.vita import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX
    head = list(rng.integers(10, vocab, 6)) + [IMAGE_TOKEN_INDEX] * tiles + list(rng.integers(10, vocab, 3)) + \
        [AUDIO_TOKEN_INDEX] * len(clips)
    ids = np.asarray(head + list(rng.integers(10, vocab, text)), np.int64)
    labels = np.full(ids.shape, IGNORE_INDEX, np.int64)
    labels[len(head) + 2:] = ids[len(head) + 2:]
    ex = {"id": f"ex{i}", "input_ids": ids, "labels": labels}
    if tiles:
        ex["pixels"] = rng.normal(0, 1, (tiles, 3, size, size)).astype(np.float32)
    if clips:
        ex["audio"] = [(rng.normal(0, 1, (n, 80)) * 3 + 8).astype(np.float32) for n in clips]
    return ex
