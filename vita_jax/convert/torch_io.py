"""PyTorch ``.pt`` state dicts (``torch.load(..., weights_only=True)`` only) behind the same
reader interface as :class:`~vita_jax.convert.safetensors_io.SafetensorsReader`."""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np

from vita_jax.convert.safetensors_io import CheckpointError


def _to_numpy(t):
    import torch  # optional dependency (the [torch] extra); only .pt files need it
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def torch_load(path: str):
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    try:
        import torch  # optional dependency (the [torch] extra); only .pt files need it
    except ImportError as e:
        raise CheckpointError(f"{path}: reading .pt files needs torch (pip install 'vita_jax[torch]')") from e
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot load as a weights-only PyTorch state dict: {e}") from e


class TorchReader:
    """All tensors of a state-dict ``.pt`` file (optionally nested under a key such as ``model``)."""

    def __init__(self, path: str, prefix_strip: str = ""):
        self.source = path
        sd = torch_load(path)
        for k in ("state_dict", "model"):
            if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
                sd = sd[k]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
        self._sd = {k[len(prefix_strip):] if k.startswith(prefix_strip) else k: v for k, v in sd.items()
                    if hasattr(v, "shape")}

    def keys(self):
        return list(self._sd)

    def __contains__(self, key):
        return key in self._sd

    def shape(self, key):
        if key not in self._sd:
            raise CheckpointError(f"tensor {key!r} is missing from {self.source}")
        return tuple(self._sd[key].shape)

    def dtype(self, key) -> np.dtype:
        self.shape(key)
        t = self._sd[key]
        return np.dtype(ml_dtypes.bfloat16) if str(t.dtype) == "torch.bfloat16" else t.detach().cpu().numpy().dtype

    def file(self, key) -> str:
        return self.source

    def get(self, key) -> np.ndarray:
        self.shape(key)
        return _to_numpy(self._sd[key].detach().cpu().contiguous())

    @staticmethod
    def load_nested(path: str) -> dict:
        """A ``.pt`` holding ``{part: state_dict}`` (e.g. TiCodec's generator / quantizer / encoder)
        -> ``{part: {key: numpy array}}`` (weights-only unpickling)."""
        sd = torch_load(path)
        if not isinstance(sd, dict) or not all(isinstance(v, dict) for v in sd.values()):
            raise CheckpointError(f"{path}: expected {{part: state_dict}}")
        return {part: {k: _to_numpy(v.detach().cpu().contiguous()) for k, v in d.items()} for part, d in sd.items()}
