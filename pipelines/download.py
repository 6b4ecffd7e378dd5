"""The img2dataset call of the ingest: one staging folder in, webdataset shards out.

    run_img2dataset(input_path, out_dir, first_id=..., config=...) -> wall seconds

What ingest changes in img2dataset 1.47 for the call (its options have no hook for any of it):
- its `Reader` is wrapped so shard ids start at `first_id` (ids continue the corpus; it writes
  into a fresh node-local staging folder, `pipelines.rawcommit`, where its extend mode sees no
  shard; it could not parse the catalog's `NNNNN.done.json` anyway);
- its `Resizer` is `pipelines.imagecheck.GuardedResizer`, pickled into every spawned download
  worker, where it installs the connection guard and the bounded fetch (`pipelines.fetch`: an
  overall per-URL deadline and a byte cap) before any URL of a shard is fetched;
- its SIGINT handler (exit status 0, never removed) is undone, and its exit(0) on Ctrl-C becomes
  `KeyboardInterrupt`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from unittest import mock

from pipelines.imagecheck import GuardedResizer
from pipelines.rawcorpus import ENCODE_FORMAT

if TYPE_CHECKING:
    from pipelines.ingest import IngestConfig

RESIZE_MODE = "center_crop"


def run_img2dataset(input_path: str, out_dir: str, *, first_id: int, config: IngestConfig) -> float:
    """Download the rows of `input_path` into shards `first_id`, ... of `out_dir`; returns the
    wall seconds of the img2dataset call."""
    i2d = importlib.import_module("img2dataset.main")  # the package re-exports a function `main`

    def reader_from_first_id(*args: Any, **kwargs: Any) -> Any:
        reader = real_reader(*args, **kwargs)
        reader.start_shard_id = first_id  # shard ids continue the corpus (see module docstring)
        return reader

    real_reader = i2d.Reader
    resizer = functools.partial(
        GuardedResizer,
        allow_private_hosts=config.allow_private_hosts,
        deadline_s=config.deadline,
        max_image_bytes=config.max_image_bytes,
        max_resize_pixels=config.max_resize_pixels,
    )
    start = time.perf_counter()
    previous_sigint = signal.getsignal(signal.SIGINT)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(i2d, "Reader", reader_from_first_id))
        stack.enter_context(mock.patch.object(i2d, "Resizer", resizer))
        # download() installs a SIGINT handler that exits with status 0 and never removes it.
        stack.callback(signal.signal, signal.SIGINT, previous_sigint)
        stack.enter_context(_interrupt_is_not_success())
        i2d.download(
            url_list=input_path,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=["uid"],
            output_folder=out_dir,
            output_format="webdataset",
            image_size=config.image_size,
            resize_mode=RESIZE_MODE,
            encode_format=ENCODE_FORMAT,
            processes_count=config.processes,
            thread_count=config.threads,
            timeout=config.timeout,
            retries=config.retries,
            number_sample_per_shard=config.samples_per_shard,
            extract_exif=False,
            compute_hash="sha256",
            enable_wandb=False,
            distributor="multiprocessing",
            incremental_mode="extend",
            max_shard_retry=1,
        )
    return time.perf_counter() - start


@contextlib.contextmanager
def _interrupt_is_not_success() -> Iterator[None]:
    try:
        yield
    except SystemExit as exit_:  # img2dataset's Ctrl-C handler: sys.exit(0)
        raise KeyboardInterrupt("ingest interrupted during download") from exit_
