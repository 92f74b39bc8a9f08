"""Damaged safetensors headers (issue #24): each shard's header is checked when it is read (a JSON object of
``{dtype, shape, data_offsets}`` entries), so `vita-jax convert` names the shard in one line instead of a traceback."""
import json
import os
import struct

import pytest

from conftest import TINY, cli_error

SHARD = "model-00002-of-00002.safetensors"


def _release_with_header(tmp_path, edit):
    """The fixture release (files linked) whose second shard's header is ``edit(header)``."""
    d = tmp_path / "release"
    d.mkdir()
    for name in os.listdir(TINY):
        if name != SHARD:
            os.symlink(os.path.join(TINY, name), d / name)
    raw = open(os.path.join(TINY, SHARD), "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    (d / SHARD).write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    return d


def _first(h, **change):
    k = next(k for k in h if k != "__metadata__")
    h[k] = change.get("entry", dict(h[k], **{f: v for f, v in change.items() if f != "entry"}))
    return h


@pytest.mark.parametrize("edit, named", [
    (lambda h: [h], "a JSON list, not an object"),
    (lambda h: "header", "a JSON str, not an object"),
    (lambda h: _first(h, entry=[1, 2]), "is a JSON list, not an object"),
    (lambda h: _first(h, dtype=None), "has no dtype string"),
    (lambda h: _first(h, shape="4x4"), "has shape '4x4'"),
    (lambda h: _first(h, shape=[4, -1]), "has shape [4, -1]"),
    (lambda h: _first(h, data_offsets=[8]), "has data_offsets [8]"),
    (lambda h: _first(h, data_offsets=[16, 8]), "has data_offsets [16, 8]"),
])
def test_damaged_shard_header_names_the_shard(tmp_path, capsys, edit, named):
    d = _release_with_header(tmp_path, edit)
    line = cli_error(capsys, "convert", "--to", "orbax", str(d), str(tmp_path / "out"))
    assert f"{d / SHARD}: corrupt safetensors header" in line and named in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------- refused early, one line naming the file, field or option


@pytest.mark.parametrize("index", ['"a string"', "[1, 2]", '{"weight_map": "model.safetensors"}',
                                   '{"weight_map": {"lm_head.weight": 3}}', '{"weight_map": {"a": "b"'])
def test_bad_safetensors_index_is_one_line(tmp_path, capsys, index):
    d = tmp_path / "release"
    d.mkdir()
    for name in os.listdir(TINY):  # the fixture's files (linked), with a damaged index
        if name != "model.safetensors.index.json":
            os.symlink(os.path.join(TINY, name), d / name)
    (d / "model.safetensors.index.json").write_text(index)
    line = cli_error(capsys, "generate", str(d), "--ids", "1,2")
    assert str(d / "model.safetensors.index.json") in line and "weight_map" in line
