"""
`Policy`: every knob of one cache entry's life, validated when it is created.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ._checks import check_number
from .errors import ConfigurationError

__all__ = ("Policy",)

#: Redis keeps expiries in milliseconds as signed 64-bit integers; anything past a year is a
#: mistake (seconds given as milliseconds, say), so we refuse it rather than cache "forever".
MAX_TTL = 365 * 24 * 3600.0
#: Redis keeps expiries in whole milliseconds (``PX``): a TTL below one would be stored as a
#: millisecond anyway (``ttl=1e-9`` living a million times longer than asked), so it is refused.
MIN_TTL = 0.001


def _check_seconds(
    field: str, value: object, *, optional: bool = False, minimum: float | None = None
) -> None:
    """`check_number` for a time: above 0 (or at least ``minimum``), at most `MAX_TTL`."""
    if value is None and optional:
        return
    lower = "> 0" if minimum is None else f">= {minimum:g}"
    accepted = f"a finite number of seconds {lower} and <= {MAX_TTL:.0f}" + (
        ", or None" if optional else ""
    )
    above = 0 if minimum is None else None
    check_number(field, value, above=above, at_least=minimum, at_most=MAX_TTL, accepted=accepted)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """
    How long entries live and how misses are guarded. Times are float seconds.

    Args:
        ttl: Hard time to live of a cached value in Redis. Required: there is no safe default.
            At least 1 ms, Redis's resolution.
        soft_ttl: Logical expiry, strictly less than ``ttl``. ``None`` (the default) turns
            logical expiry off.
        negative_ttl: How long a loader's ``None`` ("this row does not exist") is cached, so
            lookups of absent rows stop reaching the database. ``None`` means negative results
            are not cached at all. At least 1 ms. Default 5 seconds, whatever ``ttl`` is:
            see "Combinations" below.
        lock: Guard misses with the distributed rebuild lock, so one process in the whole
            deployment calls the loader. ``False`` keeps only the in-process single-flight.
        lock_ttl: The rebuild lock's lease. The holder renews it every third of it while the
            loader runs; if the holder dies, another process takes over within this time.
            At least 0.05 s. Default 5 s.
        wait_timeout: How long a process waits for another process's fill before it gives up
            (see ``on_wait_timeout``). Default 15 s, the default load_timeout plus one lease.
        load_timeout: How long a loader may run before it is cancelled and `LoadTimeout`
            raised to every caller of its flight. ``None``: no limit. Default 10 s.
        on_wait_timeout: ``"load"`` (default): when waiting runs out, call the loader
            locally rather than return nothing; ``"raise"``: raise `LockTimeout`.
        early_beta: XFetch's beta. Above 0, a read may refresh a value in the background
            before it expires, with a chance that grows as expiry nears and with the time the
            value took to compute. 1.0 is the paper's choice; 0 (the default) turns it off.
        stale_if_error: When the loader (or a refresh) fails or times out, keep serving the
            previous value for up to this many seconds past its expiry. Redis keeps values
            this much longer. ``None`` (default): never serve a value past ``ttl``.
        jitter: Each write shortens ``ttl`` (and ``soft_ttl``, ``negative_ttl``) by a random
            fraction up to this, so keys written together do not expire together. In [0, 1);
            default 0.1.
        local_ttl: Seconds an entry of this policy is served from the Cache's L1
            (``Cache(local=LocalCache(...))``) at most, instead of the LocalCache's ``ttl``;
            0 keeps this policy's entries out of the L1. ``None`` (default): the LocalCache's.
            Ignored without an L1. Whatever it says, an L1 entry never outlives its record's
            ``soft_ttl`` (or ``ttl``).

    Combinations accepted on purpose:
        Each knob bounds a different thing, so none of these is an error.

        - ``negative_ttl > ttl``: how long an absence may be reported is a choice of its own
          (absent ids probed by a scanner may be cached longer than values that change), and
          the 5 s default stays valid with a short ``ttl`` (``@cached(cache, ttl=1)``). A
          row created meanwhile is reported absent for up to ``negative_ttl``: where absences
          must be as fresh as values, give ``negative_ttl <= ttl`` too.
        - ``lock_ttl > ttl``: the lease bounds how long a dead holder blocks its waiters, not
          how long a value lives; it is renewed while the loader runs, and the lock key is
          gone once the fill (or the holder's failure) releases it.
        - ``wait_timeout < load_timeout`` (or below ``load_timeout + lock_ttl``): how a
          latency-bound caller caps its wait for another process's load. The cost is a
          second load of the key in each process that gave up (``on_wait_timeout="load"``) or
          a `LockTimeout` (``"raise"``), never an empty result.

    Raises:
        ConfigurationError: a field is negative, zero, NaN, infinite, over a year, a TTL is
            below 1 ms, or ``soft_ttl >= ttl``. The message names the field and what is
            accepted.

    Example:
        >>> Policy(ttl=30.0, soft_ttl=25.0)
        Policy(ttl=30.0, soft_ttl=25.0, negative_ttl=5.0, lock=True, lock_ttl=5.0, ...)
        >>> Policy(ttl=0)
        Traceback (most recent call last):
        ...
        aiocacheguard.errors.ConfigurationError: ttl=0 is not accepted: a finite number of ...
    """

    ttl: float
    soft_ttl: float | None = None
    negative_ttl: float | None = 5.0
    lock: bool = True
    lock_ttl: float = 5.0
    wait_timeout: float = 15.0
    load_timeout: float | None = 10.0
    on_wait_timeout: Literal["load", "raise"] = "load"
    early_beta: float = 0.0
    stale_if_error: float | None = None
    jitter: float = 0.1
    local_ttl: float | None = None

    def __post_init__(self) -> None:
        _check_seconds("ttl", self.ttl, minimum=MIN_TTL)
        _check_seconds("soft_ttl", self.soft_ttl, optional=True)
        _check_seconds("negative_ttl", self.negative_ttl, optional=True, minimum=MIN_TTL)
        _check_seconds("lock_ttl", self.lock_ttl, minimum=0.05)
        _check_seconds("wait_timeout", self.wait_timeout)
        _check_seconds("load_timeout", self.load_timeout, optional=True)
        _check_seconds("stale_if_error", self.stale_if_error, optional=True)
        check_number("early_beta", self.early_beta, at_least=0, at_most=100)
        check_number("jitter", self.jitter, at_least=0, below=1)
        if self.local_ttl is not None:
            check_number("local_ttl", self.local_ttl, at_least=0, at_most=24 * 3600.0)
        if not isinstance(self.lock, bool):
            raise ConfigurationError("lock", self.lock, "True or False")
        if self.on_wait_timeout not in ("load", "raise"):
            raise ConfigurationError("on_wait_timeout", self.on_wait_timeout, '"load" or "raise"')
        if self.soft_ttl is not None and self.soft_ttl >= self.ttl:
            raise ConfigurationError(
                "soft_ttl", self.soft_ttl, f"a number of seconds below ttl={self.ttl!r}"
            )

    def for_call(self, policy: object, loader: object) -> Policy:
        """
        The policy of one call (``policy``, or this default), its arguments checked before
        any I/O.

        Raises:
            ConfigurationError: ``loader`` is not callable or ``policy`` is not a `Policy`.
        """
        if not callable(loader):
            raise ConfigurationError("loader", loader, "an async function of no arguments")
        if policy is None:
            return self
        if not isinstance(policy, Policy):
            raise ConfigurationError("policy", policy, "an aiocacheguard.Policy or None")
        return policy

    def for_write(self, *, ttl: float | None, negative: bool, jitter: bool = False) -> Policy:
        """
        The policy of an explicit write (``Cache.set``): ``ttl`` replaces this TTL, without
        jitter (with this policy's where ``jitter``: a warm-up writing many keys at once),
        keeping ``stale_if_error`` and the soft TTL at the same fraction of it; an explicit
        ``None`` is stored even where negative results are not cached.
        """
        if ttl is not None:
            _check_seconds("ttl", ttl, minimum=MIN_TTL)
            soft = None if self.soft_ttl is None else self.soft_ttl * ttl / self.ttl
            spread = self.jitter if jitter else 0.0
            return replace(self, ttl=ttl, soft_ttl=soft, negative_ttl=ttl, jitter=spread)
        if negative and self.negative_ttl is None:
            return replace(self, negative_ttl=self.ttl)
        return self
