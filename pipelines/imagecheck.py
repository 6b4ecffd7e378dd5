"""What ingest runs inside img2dataset's download workers: image checks and the connection guard.

img2dataset has no hook for either, but it pickles its downloader, and with it the resizer, into
every spawned download worker. So ingest hands it `GuardedResizer`:
- its `__setstate__` runs in each worker before any URL of a shard is fetched and installs
  `pipelines.netguard.guarded_opener` as that process's urllib opener (every redirect hop and DNS
  answer is checked at connect time);
- its `__call__` refuses non-images (`not an image: ...`) and decompression bombs from the header
  alone, before OpenCV allocates any pixels: PIL reads the declared size, and images over
  `MAX_IMAGE_PIXELS` are refused (OpenCV alone accepts up to 2**30 pixels). It also rewrites
  img2dataset's vague decoding errors into messages `pipelines.rawcorpus.failure_cause` maps to
  `truncated_image` and `decompression_bomb`.
Workers unpickle the class by its module name, `pipelines.imagecheck`, whatever the entry point.
"""

from __future__ import annotations

import io
import os
import urllib.request
import warnings
from typing import Any

# img2dataset imports wandb and albumentations, whose import-time update check goes to the network;
# its download workers are spawned with this environment.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
from img2dataset.resizer import Resizer  # noqa: E402

from pipelines.netguard import guarded_opener  # noqa: E402

MAX_IMAGE_PIXELS = 89_478_485
"""PIL's default bomb threshold (~9459 x 9459); OpenCV alone would decode up to 2**30 pixels."""

_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
)


def sniff_image(head: bytes) -> str | None:
    """The image format a byte prefix announces, or None when it is no known image signature."""
    for magic, kind in _SIGNATURES:
        if head.startswith(magic):
            return kind
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":  # BMP's reserved header fields are zero
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return "heif/avif"
    return None


def precheck_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Refuse non-images and decompression bombs from the header alone (no pixel decoding)."""
    kind = sniff_image(data[:16])
    if kind is None:
        return "not an image: no known image signature"
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError as err:
        return f"decompression bomb: {err}"
    except Exception:  # noqa: BLE001 - PIL cannot read the header: let OpenCV decide
        return None
    if width * height > max_pixels:
        return f"decompression bomb: {kind} declares {width}x{height} pixels (limit {max_pixels})"
    return None


class GuardedResizer(Resizer):
    """img2dataset's Resizer with ingest's checks; also arms the connection guard in each worker.

    img2dataset pickles its downloader (and so this resizer) into every spawned download worker;
    `__setstate__` runs there, before any URL of the shard is fetched, and installs
    `guarded_opener` as urllib's global opener of that worker process.
    """

    def __init__(
        self,
        *args: Any,
        allow_private_hosts: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.allow_private_hosts = allow_private_hosts
        self.max_pixels = max_pixels

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        urllib.request.install_opener(guarded_opener(allow_private_hosts=self.allow_private_hosts))

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        data = img_stream.getvalue()
        if cause := precheck_image(data, self.max_pixels):
            return None, None, None, None, None, cause
        img_stream.seek(0)
        out = super().__call__(img_stream, blurring_bbox_list)
        error = out[-1]
        if error == "Image decoding error":
            error = f"truncated or corrupt {sniff_image(data[:16])} image: decoding failed"
        elif error and "CV_IO_MAX_IMAGE_PIXELS" in error:
            error = "decompression bomb: over OpenCV's pixel limit"
        return (*out[:-1], error)
