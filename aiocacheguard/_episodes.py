"""
Repeated failures said once per episode, at the level an operator wants.

A failure that can repeat thousands of times a minute (a background refresh whose database is
down, a write Redis refuses) must neither flood the log nor go quiet while it lasts. An
`Episode` says the first failure at WARNING with its error, then, while failures go on, one
WARNING summary with their count at most every ``every`` seconds, and one INFO line with the
total when the episode ends. An episode ends after ``quiet`` seconds without a failure: at the
next success (`Episode.succeeded`), or at the next failure, which then opens a new one.

Successes alone do not end an episode sooner: refreshes of other keys (or other writes) may
succeed between failures of the same cause, and each of those must not start a new warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

__all__ = ("EPISODE_SECONDS", "Episode")

logger = logging.getLogger("aiocacheguard")

#: The default summary interval and quiet time: failures less than a minute apart are one
#: episode, and a long one is summed up once a minute.
EPISODE_SECONDS: Final = 60.0


class Episode:
    """
    One kind of repeated failure, logged once per episode with counts.

    Args:
        what: What fails, as the summaries name it ("background refreshes").
        every: Seconds between two summaries of a long episode.
        quiet: Seconds without a failure that end an episode.
        clock: Monotonic-enough seconds (a Cache's clock, so tests can move it).

    Example:
        >>> now = [0.0]
        >>> episode = Episode("refreshes", clock=lambda: now[0])
        >>> for second in range(0, 90):  # a failure a second for a minute and a half
        ...     now[0] = float(second)
        ...     episode.failed("refresh of 'k' failed: boom")
        >>> (episode.failures, episode.lines)  # the first said, and a summary at 60 s
        (90, 2)
        >>> now[0] = 200.0  # a quiet minute and more, then a success
        >>> episode.succeeded()  # INFO: refreshes work again: 90 failed over 89s ...
        >>> episode.lines
        3
    """

    __slots__ = (
        "_clock",
        "_every",
        "_last_failure",
        "_latest",
        "_open",
        "_quiet",
        "_said_at",
        "_started",
        "_unsaid",
        "_what",
        "failures",
        "lines",
    )

    def __init__(
        self,
        what: str,
        *,
        every: float = EPISODE_SECONDS,
        quiet: float = EPISODE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._what = what
        self._every = every
        self._quiet = quiet
        self._clock = clock
        self._open = False
        self._started = self._last_failure = self._said_at = 0.0
        self._unsaid = 0
        self._latest = ""
        #: Failures in the current (or last) episode, and log lines it took to say them.
        self.failures = 0
        self.lines = 0

    def failed(self, detail: str) -> None:
        """A failure: the first of an episode is logged with ``detail``, the others counted."""
        now = self._clock()
        if self._open and now - self._last_failure >= self._quiet:
            self._end(now)
        self._last_failure = now
        self._latest = detail
        if not self._open:
            self._open, self._started, self._said_at = True, now, now
            self.failures, self.lines, self._unsaid = 1, 1, 0
            logger.warning("%s", detail)
            return
        self.failures += 1
        self._unsaid += 1
        if now - self._said_at >= self._every:
            self.lines += 1
            logger.warning(
                "%s keep failing: %d more in the last %.0fs (%d since the episode began "
                "%.0fs ago); the latest: %s",
                self._what,
                self._unsaid,
                now - self._said_at,
                self.failures,
                now - self._started,
                detail,
            )
            self._said_at, self._unsaid = now, 0

    def succeeded(self) -> None:
        """A success: it ends the episode if no failure came for ``quiet`` seconds."""
        if self._open and self._clock() - self._last_failure >= self._quiet:
            self._end(self._clock())

    def _end(self, now: float) -> None:
        self._open = False
        self.lines += 1
        logger.info(
            "%s work again: %d failed over %.0fs (%d since the last warning); the last: %s",
            self._what,
            self.failures,
            self._last_failure - self._started,
            self._unsaid,
            self._latest,
        )
