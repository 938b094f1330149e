"""
A circuit breaker in front of Redis: when Redis is unreachable, stop paying a budget per call.

The model is resilience4j's: **closed** (calls go to Redis; outcomes enter a count-based
sliding window), **open** (calls are refused at once, without I/O, for ``open_for`` seconds),
**half-open** (up to ``half_open_probes`` calls go through at once; once that many have
succeeded it closes, if one fails it opens again; probes whose callers went away are replaced).
It opens when the failure rate over the window reaches ``failure_rate`` (once
``minimum_calls`` outcomes are in), or after ``consecutive_failures`` failures in a row, so a
single caller calling one after another does not wait for a window to fill.

Only the failures that say Redis cannot be reached count: refused or reset connections and
spent budgets. Error replies (a full Redis refusing writes under ``noeviction``, READONLY
after a failover, a script error) come from a Redis that answers: they do not open it.

Why our own: no package fits (purgatory counts consecutive failures only and pins redis < 6;
aiobreaker is unmaintained; pybreaker is for threads; circuitbreaker is untyped), and the
whole machine is a few counters read on every command, which must cost nothing.

Guarantees:
    - While open, `CircuitBreaker.allow` is False without any I/O or await, so a call that
      would have spent a budget fails in microseconds.
    - Half-open admits at most ``half_open_probes`` calls at once; the others are refused as
      if open, so a Redis coming back meets a bounded trickle, not the whole backlog.
    - Every transition is reported once, through the ``on_transition`` callback.

Limitations:
    - Per process (per Cache): each process finds out on its own that Redis is down or back.
      On a Redis Cluster, per primary (`CircuitBreaker.sibling`): a dead primary's breaker
      opens alone, and the Cache's `Cache.breaker` guards only what has no primary yet.
    - Latency that stays under the command budget is not a failure: a slow but answering
      Redis keeps the breaker closed.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._checks import check_int, check_number, check_seconds
from .._episodes import EPISODE_SECONDS

__all__ = ("Breaker", "BreakerState", "CircuitBreaker")

logger = logging.getLogger("aiocacheguard")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True, kw_only=True)
class Breaker:
    """
    How a Cache's circuit breaker decides (``Cache(..., breaker=Breaker(...))``; on by
    default, ``breaker=None`` switches it off).

    Args:
        failure_rate: Opens when at least this share of the last ``window`` calls failed.
        window: Calls in the sliding window.
        minimum_calls: Outcomes needed before the rate is judged.
        consecutive_failures: Opens after this many failures in a row, whatever the rate.
        open_for: Seconds refused before probing Redis again (half-open).
        half_open_probes: Calls let through while half-open; all must succeed to close.

    Example:
        >>> Breaker(open_for=1.0)
        Breaker(failure_rate=0.5, window=50, minimum_calls=10, consecutive_failures=5, ...)
    """

    failure_rate: float = 0.5
    window: int = 50
    minimum_calls: int = 10
    consecutive_failures: int = 5
    open_for: float = 2.0
    half_open_probes: int = 3

    def __post_init__(self) -> None:
        check_number("failure_rate", self.failure_rate, above=0.0, at_most=1.0)
        check_int("window", self.window, minimum=1, maximum=10_000)
        check_int("minimum_calls", self.minimum_calls, minimum=1, maximum=self.window)
        check_int("consecutive_failures", self.consecutive_failures, minimum=1)
        check_seconds("open_for", self.open_for, maximum=3600.0)
        check_int("half_open_probes", self.half_open_probes, minimum=1, maximum=1000)


class CircuitBreaker:
    """
    The state of one breaker. ``on_transition(old, new, node)`` is called on every change
    (``node``: the Redis Cluster primary a `sibling` guards, else None).

    Example:
        >>> breaker = CircuitBreaker(Breaker(consecutive_failures=2), clock=lambda: 0.0)
        >>> breaker.record(False); breaker.record(False)
        >>> breaker.state, breaker.allow()
        (<BreakerState.OPEN: 'open'>, False)
    """

    __slots__ = (
        "_clock",
        "_failed_probes",
        "_failures",
        "_in_a_row",
        "_on_transition",
        "_opened_at",
        "_outage_began",
        "_outcomes",
        "_probes",
        "_said_at",
        "_successes",
        "_where",
        "config",
        "node",
        "opened",
        "short_circuited",
        "state",
    )

    def __init__(
        self,
        config: Breaker,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState, str | None], None] | None = None,
        node: str | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        #: The Redis Cluster primary it guards (``host:port``); None: Redis as a whole.
        self.node = node
        self._where = "Redis" if node is None else f"Redis Cluster node {node}"  # for the log
        self.state = BreakerState.CLOSED
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=config.window)
        self._failures = 0  # failures in the window
        self._in_a_row = 0
        self._opened_at = 0.0
        # The current (or last) outage, for its log lines: when it began, when it was last
        # said, and the probes that failed in it.
        self._outage_began = self._said_at = 0.0
        self._failed_probes = 0
        self._probes = 0  # half-open calls admitted (those not yet succeeded are out)
        self._successes = 0  # half-open calls that succeeded
        #: Times the breaker opened; calls refused while it was open.
        self.opened = 0
        self.short_circuited = 0

    def allow(self) -> bool:
        """Whether a call may go to Redis now (it must then `record` its outcome)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.config.open_for:
                self.short_circuited += 1
                return False
            self._move(BreakerState.HALF_OPEN)
        if self._probes - self._successes >= self.config.half_open_probes:  # all still out
            if self._clock() - self._opened_at < 2 * self.config.open_for:
                self.short_circuited += 1
                return False
            # Some probes never reported (their callers went away, cancelled): admit more
            # rather than stay half-open for ever; the successes already seen still count.
            self._opened_at = self._clock() - self.config.open_for
            self._probes = self._successes
        self._probes += 1
        return True

    def sibling(self, node: str) -> CircuitBreaker:
        """
        A breaker of its own, with the same settings, clock and callback, for a Redis Cluster
        primary (``host:port``): one dead node must not cut off the others.
        """
        return CircuitBreaker(
            self.config, clock=self._clock, on_transition=self._on_transition, node=node
        )

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    def record(self, success: bool) -> None:
        """The outcome of a call that `allow` let through."""
        state = self.state
        if state is BreakerState.HALF_OPEN:
            if not success:
                self._open()
                return
            self._successes += 1
            if self._successes >= self.config.half_open_probes:
                self._close()
            return
        if state is BreakerState.OPEN:
            return  # a call admitted before the breaker opened: its news is old
        outcomes = self._outcomes
        if len(outcomes) == outcomes.maxlen and not outcomes[0]:
            self._failures -= 1
        outcomes.append(success)
        if success:
            self._in_a_row = 0
            return
        self._failures += 1
        self._in_a_row += 1
        config = self.config
        if self._in_a_row >= config.consecutive_failures or (
            len(outcomes) >= config.minimum_calls
            and self._failures >= config.failure_rate * len(outcomes)
        ):
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probes = self._successes = 0
        self.opened += 1
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        self._outcomes.clear()
        self._failures = self._in_a_row = 0
        self._move(BreakerState.CLOSED)

    def _move(self, new: BreakerState) -> None:
        old, self.state = self.state, new
        if old is new:
            return
        self._say(old, new)
        if self._on_transition is not None:
            self._on_transition(old, new, self.node)

    def _say(self, old: BreakerState, new: BreakerState) -> None:
        """
        An outage is said when it begins and when it ends, and summed up once a minute in
        between: a long one probes (two transitions) every ``open_for`` seconds, and each
        probe that fails is counted, at debug level, not warned about.
        """
        now = self._clock()
        level, detail = logging.DEBUG, ""
        if old is BreakerState.CLOSED:
            self._outage_began = self._said_at = now
            self._failed_probes = 0
            level, detail = logging.WARNING, f" (calls skip Redis for {self.config.open_for:g}s)"
        elif new is BreakerState.CLOSED:
            level = logging.WARNING
            detail = (
                f" (Redis answers again, after {now - self._outage_began:.0f}s and "
                f"{self._failed_probes} failed probes)"
            )
        elif new is BreakerState.OPEN:
            self._failed_probes += 1
            detail = " (a probe failed)"
            if now - self._said_at >= EPISODE_SECONDS:
                self._said_at = now
                level = logging.WARNING
                detail = (
                    f" (still failing: {self._failed_probes} failed probes since Redis became "
                    f"unreachable {now - self._outage_began:.0f}s ago)"
                )
        else:
            detail = " (probing Redis)"
        logger.log(
            level,
            "circuit breaker in front of %s: %s -> %s%s",
            self._where,
            old.value,
            new.value,
            detail,
        )
