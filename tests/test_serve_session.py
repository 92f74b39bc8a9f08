"""`vita-jax serve`'s video frames (issue #24 item 5): whatever a client's bytes are (not an image, truncated, a
header claiming a huge bitmap, a decompression bomb, another format), the frame is a ValueError that the server
sends back as an `error` message, the session going on; checked from the header before anything is decoded."""
import base64
import io
import struct
import types
import zlib

import pytest
from PIL import Image

from vita_jax.serve.session import Session


def _png(w, h, body=b""):
    """A PNG whose IHDR claims ``w`` x ``h`` RGB pixels (``body``: its IDAT data)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _encoded(fmt, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, fmt)
    return buf.getvalue()


def _frame(raw):
    s = types.SimpleNamespace(image=None)
    Session.video_frame(s, base64.b64encode(raw).decode())
    return s.image


@pytest.mark.parametrize("raw, match", [
    (_png(100000, 100000, zlib.compress(b"\x00" * 100)), "video_frame: the header claims a bitmap over Pillow's"),
    (_png(20000, 5000, zlib.compress(b"\x00" * 100)), "video_frame: the header claims a bitmap over Pillow's"),
    (_png(8000, 4000, zlib.compress(b"\x00" * 100)), "video_frame: a 8000x4000 image, at most 16777216 pixels"),
    (_png(64, 64, zlib.compress(b"\x00" * 100)), "video_frame: cannot read image (truncated or corrupt?)"),
    (_encoded("PNG")[:60], "video_frame: cannot read image (truncated or corrupt?)"),
    (b"GIF89a" + b"\x00" * 20, "video_frame: not a readable JPEG or PNG"),
    (_encoded("BMP"), "video_frame: image must be JPEG or PNG, got BMP"),
    (b"", "video_frame: not a readable JPEG or PNG"),
    (_encoded("JPEG")[:200], "video_frame: not a readable JPEG or PNG (Truncated File Read)"),
], ids=["bomb", "over-limit", "over-frame-cap", "no-pixel-data", "truncated", "gif-header", "bmp", "empty",
        "cut-jpeg-header"])
def test_bad_frame_is_a_value_error(raw, match):
    with pytest.raises(ValueError) as e:
        _frame(raw)
    assert str(e.value).startswith(match) and "\n" not in str(e.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_good_frame_is_kept_as_rgb(fmt):
    img = _frame(_encoded(fmt))
    assert img.mode == "RGB" and img.size == (40, 30)
