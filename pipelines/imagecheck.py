"""What ingest runs inside img2dataset's download workers: image checks and the connection guard.

img2dataset has no hook for either, but it pickles its downloader, and with it the resizer, into
every spawned download worker. So ingest hands it `GuardedResizer`:
- its `__setstate__` runs in each worker before any URL of a shard is fetched and installs
  `pipelines.netguard.guarded_opener` as that process's urllib opener (every redirect hop and DNS
  answer is checked at connect time) and `pipelines.fetch.download_image` as img2dataset's
  download function (an overall deadline and a byte cap per URL);
- its `__call__` refuses non-images (`not an image: ...`) and decompression bombs from the header
  alone, before OpenCV allocates any pixels: PIL reads the declared size, and images over
  `MAX_IMAGE_PIXELS` are refused (OpenCV alone accepts up to 2**30 pixels), and so are images
  whose centre-crop resize would exceed `MAX_RESIZE_PIXELS` (a thin 60000 x 1 PNG is 138 bytes
  and ~8 GiB once upscaled). It also rewrites
  img2dataset's vague decoding errors into messages `pipelines.rawcorpus.failure_cause` maps to
  `truncated_image` and `decompression_bomb`.
Workers unpickle the class by its module name, `pipelines.imagecheck`, whatever the entry point.
"""

from __future__ import annotations

import functools
import io
import math
import os
import urllib.request
import warnings
from typing import Any

# img2dataset imports wandb and albumentations, whose import-time update check goes to the network;
# its download workers are spawned with this environment.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
from img2dataset.resizer import Resizer  # noqa: E402

from pipelines import fetch  # noqa: E402
from pipelines.netguard import guarded_opener  # noqa: E402

MAX_IMAGE_BYTES = 20_000_000
"""Default byte cap of one downloaded image (`IngestConfig.max_image_bytes`)."""
DEADLINE_S = 60.0
"""Default overall seconds per URL (`IngestConfig.deadline`)."""
MAX_IMAGE_PIXELS = 89_478_485
"""PIL's default bomb threshold (~9459 x 9459); OpenCV alone would decode up to 2**30 pixels."""
MAX_RESIZE_PIXELS = 1 << 24
"""Pixel budget of the resize: the centre crop first scales the short side to `image_size`, so a
W x H image becomes image_size^2 x max(W,H)/min(W,H) pixels (a 138-byte 60000 x 1 PNG: 3 gigapixels
at 224). At 224 this refuses aspect ratios over ~334."""

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


def resize_pixels(width: int, height: int, image_size: int) -> int:
    """Pixels of the image the centre-crop resize makes before cropping (short side = image_size)."""
    return math.ceil(image_size * image_size * max(width, height) / max(1, min(width, height)))


def precheck_image(
    data: bytes,
    max_pixels: int = MAX_IMAGE_PIXELS,
    *,
    image_size: int | None = None,
    max_resize_pixels: int = MAX_RESIZE_PIXELS,
) -> str | None:
    """Refuse non-images and decompression bombs from the header alone (no pixel decoding): over
    `max_pixels` as declared, or (given the `image_size` of the resize) over `max_resize_pixels`
    once resized."""
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
    if image_size and (need := resize_pixels(width, height, image_size)) > max_resize_pixels:
        return (
            f"decompression bomb: {kind} of {width}x{height} would resize to {need} pixels "
            f"(budget {max_resize_pixels})"
        )
    return None


class GuardedResizer(Resizer):
    """img2dataset's Resizer with ingest's checks; also arms the connection guard in each worker.

    img2dataset pickles its downloader (and so this resizer) into every spawned download worker;
    `__setstate__` runs there, before any URL of the shard is fetched, and installs
    `guarded_opener` as urllib's global opener of that worker process and the bounded
    `fetch.download_image` as img2dataset's download function.
    """

    def __init__(
        self,
        *args: Any,
        allow_private_hosts: bool = False,
        max_pixels: int = MAX_IMAGE_PIXELS,
        deadline_s: float = DEADLINE_S,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_resize_pixels: int = MAX_RESIZE_PIXELS,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.allow_private_hosts = allow_private_hosts
        self.max_pixels = max_pixels
        self.max_resize_pixels = max_resize_pixels
        # img2dataset's own check after decoding, for a header PIL cannot read: the same budget.
        self.max_aspect_ratio = min(self.max_aspect_ratio, max_resize_pixels / self.image_size**2)
        self.deadline_s = deadline_s
        self.max_image_bytes = max_image_bytes

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.arm_worker()

    def arm_worker(self) -> None:
        """Install the connection guard and the bounded download in this process."""
        import img2dataset.downloader

        urllib.request.install_opener(
            guarded_opener(
                allow_private_hosts=self.allow_private_hosts,
                connect_hook=fetch.connect_within_deadline,
            )
        )
        img2dataset.downloader.download_image = functools.partial(  # type: ignore[assignment]
            fetch.download_image, deadline_s=self.deadline_s, max_bytes=self.max_image_bytes
        )

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        data = img_stream.getvalue()
        if cause := precheck_image(
            data,
            self.max_pixels,
            image_size=self.image_size,
            max_resize_pixels=self.max_resize_pixels,
        ):
            return None, None, None, None, None, cause
        img_stream.seek(0)
        out = super().__call__(img_stream, blurring_bbox_list)
        error = out[-1]
        if error == "Image decoding error":
            error = f"truncated or corrupt {sniff_image(data[:16])} image: decoding failed"
        elif error and "CV_IO_MAX_IMAGE_PIXELS" in error:
            error = "decompression bomb: over OpenCV's pixel limit"
        elif error == "aspect ratio too large":
            error = (
                f"decompression bomb: aspect ratio over the resize budget {self.max_resize_pixels}"
            )
        return (*out[:-1], error)
