"""TensorBoard for a run: a writer on process 0 at ``WORKDIR/tb`` (local, or staged and uploaded for a URL)."""
from __future__ import annotations

import jax

from vita_jax import paths


def writer(workdir: str):
    """A TensorBoard writer on process 0 (None elsewhere or without tensorboardX)."""
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter  # optional at run time (installed by default; slow import)
    except ImportError:
        return None
    tb_dir = paths.join(workdir, "tb")
    return SummaryWriter(tb_dir) if paths.is_local(tb_dir) else _StagedWriter(SummaryWriter, tb_dir)


class _StagedWriter:
    """TensorBoard for a URL work dir: the event files are written to a local folder and uploaded
    to ``WORKDIR/tb`` every minute (on a write) and at close (tensorboardX's own gs:// support needs
    extra packages and does not cover other stores)."""

    def __init__(self, writer_cls, remote: str):
        self.staged = paths.Staged(remote)
        self.writer = writer_cls(self.staged.local)

    def add_scalar(self, *args, **kwargs):
        self.writer.add_scalar(*args, **kwargs)
        if self.staged.due():
            self.writer.flush()
            self.staged.sync()

    def close(self):
        self.writer.close()
        self.staged.close()
