"""The quota actor's logic: every deployment bucket, the wait queue, leases.

Plain class, no Ray: the actor shell calls it from its single event loop, so nothing here
needs a lock. Admission reserves `prompt estimate + max_tokens` (what providers charge on
arrival) on the first candidate deployment with room; settling a lease corrects the
token entry to the real usage, so unused reservation flows back into the window.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from actors._messages import Admitted, Ask, Decision, Grant, Queued, Refusal, Settlement
from actors._windows import Entry, SlidingWindow
from topics.config import Config, Deployment

__all__ = ["DeploymentBuckets", "QuotaBook"]

MINUTE_S = 60.0


@dataclass
class DeploymentBuckets:
    """The live limits of one deployment."""

    name: str
    rpm: SlidingWindow | None
    tpm: SlidingWindow | None
    max_concurrency: int | None
    in_flight: int = 0

    @classmethod
    def of(cls, dep: Deployment, margin_s: float) -> DeploymentBuckets:
        span = MINUTE_S + margin_s
        lim = dep.limits
        return cls(
            name=dep.name,
            rpm=SlidingWindow(lim.rpm, span) if lim.rpm else None,
            tpm=SlidingWindow(lim.tpm, span) if lim.tpm else None,
            max_concurrency=lim.max_concurrency,
        )

    def can_ever_fit(self, tokens: int) -> bool:
        return self.tpm is None or tokens <= self.tpm.limit

    def fits(self, tokens: int, now: float) -> bool:
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            return False
        if self.rpm is not None and not self.rpm.fits(1, now):
            return False
        return self.tpm is None or self.tpm.fits(tokens, now)

    def headroom(self, now: float) -> float:
        """Smallest free share over this deployment's limits (1.0 = idle or unlimited)."""
        shares = [1.0]
        for w in (self.rpm, self.tpm):
            if w is not None:
                shares.append(w.remaining(now) / w.limit)
        if self.max_concurrency is not None:
            shares.append(max(0, self.max_concurrency - self.in_flight) / self.max_concurrency)
        return min(shares)

    def free_at(self, tokens: int, now: float) -> float:
        """Earliest time a request of `tokens` could fit, ignoring concurrency."""
        t = now
        for w, amount in ((self.rpm, 1), (self.tpm, tokens)):
            if w is not None:
                at = w.free_at(amount, now)
                if at is not None:
                    t = max(t, at)
        return t


@dataclass
class _Lease:
    deployment: DeploymentBuckets
    tpm_entry: Entry | None


@dataclass(order=True)
class _Waiting:
    sort_key: tuple[int, int, int]
    ask: Ask = field(compare=False)
    since: float = field(compare=False)


class QuotaBook:
    """Buckets for every deployment, a priority queue of waiting asks, outstanding leases."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
    ) -> None:
        margin_s = config.quota.window_margin_ms / 1000.0
        self._clock = clock
        self._wall_ms = wall_ms
        self._queue_max = config.quota.queue_max
        self.deployments = {d.name: DeploymentBuckets.of(d, margin_s) for d in config.deployments}
        self._queue: list[_Waiting] = []
        self._seq = itertools.count()
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self._ready: dict[str, list[Admitted]] = {}
        self.grants_total = 0

    # -- admission -------------------------------------------------------------------

    def submit(self, asks: Iterable[Ask]) -> list[Decision]:
        """Decide each ask now: granted, refused, or queued (delivered later by `take`)."""
        now = self._clock()
        out: list[Decision] = []
        for ask in asks:
            decided = self._try(ask, now, since=now)
            if decided is not None:
                out.append(decided)
            else:
                heapq.heappush(
                    self._queue,
                    _Waiting((ask.priority, ask.deadline_ms or 2**62, next(self._seq)), ask, now),
                )
                out.append(Queued(ask.ticket))
        return out

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queue_full(self) -> bool:
        return len(self._queue) >= self._queue_max

    def _try(self, ask: Ask, now: float, since: float) -> Admitted | None:
        if ask.deadline_ms is not None and ask.deadline_ms <= self._wall_ms():
            return Refusal(
                ask.ticket, "deadline_exceeded", "deadline passed while waiting for quota"
            )
        known = [self.deployments[c] for c in ask.candidates if c in self.deployments]
        if not known:
            return Refusal(ask.ticket, "internal", f"no known deployment in {list(ask.candidates)}")
        fitting = [d for d in known if d.can_ever_fit(ask.tokens)]
        if not fitting:
            biggest = max(d.tpm.limit for d in known if d.tpm is not None)
            return Refusal(
                ask.ticket,
                "request_too_large",
                f"prompt estimate {ask.prompt_tokens} + max_tokens {ask.max_tokens} = "
                f"{ask.tokens} tokens exceeds the largest TPM limit ({biggest}) of "
                f"deployments {list(ask.candidates)}",
            )
        for dep in fitting:
            if dep.fits(ask.tokens, now):
                return self._grant(ask, dep, now, since)
        return None

    def _grant(self, ask: Ask, dep: DeploymentBuckets, now: float, since: float) -> Grant:
        if dep.rpm is not None:
            dep.rpm.add(1, now)
        entry = dep.tpm.add(ask.tokens, now) if dep.tpm is not None else None
        dep.in_flight += 1
        lease = next(self._lease_ids)
        self._leases[lease] = _Lease(dep, entry)
        self.grants_total += 1
        return Grant(
            ticket=ask.ticket,
            deployment=dep.name,
            lease=lease,
            reserved_tokens=ask.tokens,
            queued_ms=(now - since) * 1000.0,
        )

    def admit_waiting(self) -> int:
        """Grant queued asks that fit now, in priority then deadline order; returns how many."""
        if not self._queue:
            return 0
        now = self._clock()
        kept: list[_Waiting] = []
        admitted = 0
        while self._queue:
            w = heapq.heappop(self._queue)
            decided = self._try(w.ask, now, since=w.since)
            if decided is None:
                kept.append(w)
                continue
            self._ready.setdefault(w.ask.owner, []).append(decided)
            admitted += 1
        for w in kept:
            heapq.heappush(self._queue, w)
        return admitted

    def take(self, owner: str) -> list[Admitted]:
        """Decisions for `owner`'s queued asks made since the last call."""
        return self._ready.pop(owner, [])

    def next_wake(self) -> float | None:
        """When a queued ask could next fit by time alone (window expiry); None if idle."""
        if not self._queue:
            return None
        now = self._clock()
        best: float | None = None
        for waiting in self._queue:
            for name in waiting.ask.candidates:
                dep = self.deployments.get(name)
                if dep is None or not dep.can_ever_fit(waiting.ask.tokens):
                    continue
                at = dep.free_at(waiting.ask.tokens, now)
                best = at if best is None else min(best, at)
        return best

    # -- reconciliation ---------------------------------------------------------------

    def settle(self, settlements: Iterable[Settlement]) -> None:
        """Return leases: correct token entries to real usage and free concurrency."""
        now = self._clock()
        for s in settlements:
            lease = self._leases.pop(s.lease, None)
            if lease is None:
                continue
            dep = lease.deployment
            dep.in_flight = max(0, dep.in_flight - 1)
            if lease.tpm_entry is not None and dep.tpm is not None:
                dep.tpm.adjust(lease.tpm_entry, s.used_tokens, now)

    # -- visibility -------------------------------------------------------------------

    def headroom(self) -> dict[str, float]:
        now = self._clock()
        return {name: d.headroom(now) for name, d in self.deployments.items()}

    def snapshot(self) -> dict[str, object]:
        now = self._clock()
        deps: dict[str, object] = {}
        for name, d in self.deployments.items():
            buckets: dict[str, object] = {}
            for label, w in (("rpm", d.rpm), ("tpm", d.tpm)):
                if w is not None:
                    buckets[label] = {
                        "used": w.used(now),
                        "limit": w.limit,
                        "reset_s": round(w.reset_at(now) - now, 3),
                    }
            buckets["in_flight"] = d.in_flight
            if d.max_concurrency is not None:
                buckets["max_concurrency"] = d.max_concurrency
            deps[name] = buckets
        by_tenant: dict[str, int] = {}
        for waiting in self._queue:
            by_tenant[waiting.ask.tenant] = by_tenant.get(waiting.ask.tenant, 0) + 1
        return {
            "deployments": deps,
            "queue_depth": len(self._queue),
            "queue_by_tenant": by_tenant,
            "leases": len(self._leases),
            "grants_total": self.grants_total,
        }
