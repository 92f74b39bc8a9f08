"""The notebooks run top to bottom (nbclient) at tiny size, on the fixtures."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

NB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "finetune.ipynb", "finetune_lora.ipynb"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("VITA_NB_WORKDIR", str(tmp_path))
    monkeypatch.setenv("VITA_NB_STEPS", "30")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(os.path.join(NB, name), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": NB}}).execute()
    outs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    if name == "quickstart.ipynb":
        assert (tmp_path / "answer.wav").exists() and "s of audio" in outs
    elif name == "finetune.ipynb":
        assert (tmp_path / "loss.png").exists() and "loss" in outs
    else:
        assert (tmp_path / "lora_loss.png").exists() and "merged model" in outs and "lora_a" in outs
