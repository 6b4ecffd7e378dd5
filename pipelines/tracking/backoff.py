"""When a tracker tries MLflow again during an outage: the non-blocking retry schedule.

Not a blocking retry (`tenacity`): the caller (a training step, a stage) must return between
attempts with its ops queued (`outbox`); the next attempt is made by a later call once it is due.
The interval doubles while the outage lasts, from `interval_s` up to `MAX_INTERVAL_S`: against a
server that accepts connections but never answers, each attempt costs the caller a full request
timeout, so attempts must thin out. One warning when an outage begins, one when it ends.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

MAX_INTERVAL_S = 60.0
"""Longest wait between two delivery attempts during an outage."""


class OutageBackoff:
    """The outage state of one tracker's store at `uri` (queue in `queue_path`, for the warning)."""

    def __init__(self, interval_s: float, *, uri: str, queue_path: object) -> None:
        self.interval_s = interval_s
        self.uri = uri
        self.queue_path = queue_path
        self.since: float | None = None
        self._delay = interval_s
        self._next = 0.0

    def waiting(self) -> bool:
        """In an outage and the next attempt is not due yet."""
        return self.since is not None and time.monotonic() < self._next

    def failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since, self._delay = now, self.interval_s
            logger.warning(
                "MLflow at %s is unreachable (%s): queuing to %s, retrying from every %gs",
                self.uri, exc, self.queue_path, self.interval_s,
            )  # fmt: skip
        else:
            self._delay = min(self._delay * 2, max(self.interval_s, MAX_INTERVAL_S))
        self._next = now + self._delay

    def succeeded(self, pending: int) -> None:
        if self.since is not None:
            logger.warning(
                "MLflow at %s is reachable again after %.0fs; %d ops still queued",
                self.uri, time.monotonic() - self.since, pending,
            )  # fmt: skip
            self.since = None
