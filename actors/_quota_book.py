"""The quota actor's logic: every bucket, the fair wait queue, leases, budgets.

Plain class, no Ray: the actor shell calls it from one event loop, so nothing here locks.

Admission reserves what providers charge on arrival (`prompt estimate + max_tokens`, one
request) in every window of the chosen deployment — 60 s, the quantized 1 s, the day —
and in the tenant's own windows and budgets; settling a lease corrects the token entries
to the real use. Waiting asks are served by strict priority, then by weighted fair
queuing between tenants (virtual time advanced by tokens / weight), then by deadline. A
head that does not fit reserves its deployments for the rest of the pass, so a large
request cannot be starved by a stream of small ones, and a light tenant waits at most
for the heads ahead of it in virtual time.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from actors._breaker import CircuitBreaker
from actors._messages import (
    Admitted,
    Ask,
    Decision,
    DeploymentState,
    Grant,
    Observation,
    Queued,
    Refusal,
    Settlement,
)
from actors._replies import cost_usd
from actors._windows import Entry, SlidingWindow
from topics.config import BreakerConfig, Config, Deployment, Price, Tenant

__all__ = ["DeploymentBuckets", "QuotaBook", "TenantBuckets"]

MINUTE_S = 60.0
SECOND_S = 1.0
DAY_S = 86_400.0
MONTH_KEY_DIVISOR = 100  # month key = year * 100 + month
RATE_WINDOW_S = 10
_FAR_FUTURE_MS = 2**62


def _cost(
    price: Price, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> float:
    return cost_usd(price, prompt_tokens, completion_tokens, cached_tokens)


def _freeze_s(obs: Observation, default_s: float) -> float:
    """How long a 429 freezes a deployment: `retry-after(-ms)`, else the reset of the limit
    the provider says is used up (`x-ratelimit-remaining-* == 0`), else the default."""
    if obs.retry_after_ms is not None:
        return obs.retry_after_ms / 1000.0
    resets = [
        reset
        for remaining, reset in (
            (obs.remaining_requests, obs.reset_requests_s),
            (obs.remaining_tokens, obs.reset_tokens_s),
        )
        if remaining == 0 and reset is not None
    ]
    return max(resets) if resets else default_s


@dataclass
class DeploymentBuckets:
    """The live limits of one deployment: request windows, token windows, concurrency."""

    name: str
    price: Price
    requests: list[SlidingWindow]
    tokens: list[SlidingWindow]
    # Short windows admit a request larger than their limit when empty (providers do).
    short: set[int]
    max_concurrency: int | None
    rpm: SlidingWindow | None
    tpm: SlidingWindow | None
    # The minute limits, which cap what a day window can have been charged per minute.
    minute_caps: tuple[int | None, int | None] = (None, None)
    # Calls on quantized deployments leave this long after their grant (quantized_pace_ms):
    # every window is checked and charged at that moment, not at the grant.
    pace_s: float = 0.0
    in_flight: int = 0
    # In-flight calls a restarted actor inherited from its checkpoint, not from leases.
    inherited_in_flight: int = 0
    frozen_until: float = 0.0
    exhausted: bool = False
    # When it was marked exhausted (monotonic); after `quota.exhausted_retry_s` it is
    # tried again (credit may have been added), and marked again if still refused.
    exhausted_at: float = 0.0
    upstream_429s: int = 0
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(BreakerConfig()))
    # Exponentially weighted mean time to first token of successful calls.
    ttft_ewma_ms: float | None = None
    # The breaker state last published as an event.
    breaker_reported: str = "closed"

    @property
    def windows(self) -> list[SlidingWindow]:
        return self.requests + self.tokens

    @classmethod
    def of(
        cls,
        dep: Deployment,
        margin_s: float,
        second_margin_s: float,
        day_bucket_s: float,
        pace_s: float = 0.0,
        breaker: BreakerConfig | None = None,
    ) -> DeploymentBuckets:
        lim = dep.limits
        minute = MINUTE_S + margin_s
        second = SECOND_S + second_margin_s
        rpm = SlidingWindow(lim.rpm, minute, merge=True) if lim.rpm else None
        tpm = SlidingWindow(lim.tpm, minute, merge=True) if lim.tpm else None
        requests = [w for w in (rpm,) if w]
        tokens = [w for w in (tpm,) if w]
        short: set[int] = set()
        if lim.quantize_per_second:
            if lim.rpm:
                w = SlidingWindow(math.ceil(lim.rpm / 60), second)
                requests.append(w)
                short.add(id(w))
            if lim.tpm:
                w = SlidingWindow(math.ceil(lim.tpm / 60), second)
                tokens.append(w)
                short.add(id(w))
        if lim.rpd:
            requests.append(SlidingWindow(lim.rpd, DAY_S + margin_s, bucket_s=day_bucket_s))
        if lim.tpd:
            tokens.append(SlidingWindow(lim.tpd, DAY_S + margin_s, bucket_s=day_bucket_s))
        return cls(
            dep.name,
            dep.price,
            requests,
            tokens,
            short,
            lim.max_concurrency,
            rpm,
            tpm,
            (lim.rpm, lim.tpm),
            pace_s=pace_s if short else 0.0,
            breaker=CircuitBreaker(breaker or BreakerConfig()),
        )

    def hidden_caps(self, elapsed_s: float) -> list[int]:
        """Per window: the most that can have been granted in `elapsed_s` unseen.

        The quantized 1 s windows bound the rate, so a checkpoint `elapsed_s` old can miss
        at most that many seconds' worth; without them, a whole minute's limit.
        """
        caps: list[int] = []
        for kind, windows in ((0, self.requests), (1, self.tokens)):
            per_s = next((w.limit for w in windows if id(w) in self.short), None)
            minute = self.minute_caps[kind]
            for w in windows:
                cap = w.limit
                if per_s is not None:
                    cap = min(cap, per_s * math.ceil(elapsed_s + SECOND_S))
                elif w.span_s >= DAY_S and minute:
                    cap = min(cap, minute * math.ceil(elapsed_s / MINUTE_S + 1))
                caps.append(cap)
        return caps

    def healthy(self, now: float) -> bool:
        """Neither exhausted nor behind an open breaker (busy or frozen is still healthy)."""
        return not self.exhausted and self.breaker.state(now) != "open"

    def can_ever_fit(self, tokens: int) -> bool:
        # A plain loop, not `all()` over a generator: 0.1 us instead of 0.6 (it runs for
        # every candidate of every ask).
        for w in self.tokens:  # noqa: SIM110
            if tokens > w.limit and id(w) not in self.short:
                return False
        return True

    def fits(self, tokens: int, now: float) -> bool:
        if self.exhausted or now < self.frozen_until or not self.breaker.allows(now):
            return False
        now += self.pace_s  # the windows as they will be when the call leaves
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            return False
        for w in self.requests:
            if not w.fits(1, now):
                return False
        for w in self.tokens:
            ok = w.fits_or_empty(tokens, now) if id(w) in self.short else w.fits(tokens, now)
            if not ok:
                return False
        return True

    def headroom(self, now: float) -> float:
        """Smallest free share over the minute limits and concurrency (1.0 = idle)."""
        if self.exhausted or now < self.frozen_until or self.breaker.state(now) == "open":
            return 0.0
        shares = [1.0]
        for w in (self.rpm, self.tpm):
            if w is not None:
                shares.append(w.remaining(now) / w.limit)
        if self.max_concurrency is not None:
            shares.append(max(0, self.max_concurrency - self.in_flight) / self.max_concurrency)
        return min(shares)

    def free_at(self, tokens: int, now: float) -> float:
        """Earliest time `tokens` could fit by time alone (concurrency and others ignored)."""
        frozen_until = max(self.frozen_until, self.breaker.open_until() or 0.0) + self.pace_s
        now += self.pace_s
        t = max(now, frozen_until)
        for w in self.requests:
            at = w.free_at(1, now)
            t = max(t, at if at is not None else t)
        for w in self.tokens:
            at = w.free_at(min(tokens, w.limit) if id(w) in self.short else tokens, now)
            t = max(t, at if at is not None else t)
        return t - self.pace_s  # back to grant time


@dataclass
class TenantBuckets:
    """A tenant's rate windows, budgets (used + reserved in flight) and fair-share state."""

    name: str
    weight: float
    windows: list[tuple[SlidingWindow, bool]]  # (window, counts tokens)
    daily_tokens: int | None
    monthly_budget_usd: float | None
    daily_budget_usd: float | None = None
    day_key: int = 0
    day_used: int = 0
    day_reserved: int = 0
    day_used_usd: float = 0.0
    day_reserved_usd: float = 0.0
    month_key: int = 0
    month_used_usd: float = 0.0
    month_reserved_usd: float = 0.0
    vtime: float = 0.0
    alerts_fired: set[tuple[str, float]] = field(default_factory=set)
    # The UTC day (wall ms, [start, end)) the keys were last rolled in: within it nothing
    # can change, so `roll` returns at once (it runs for every ask).
    rolled_day_ms: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def of(cls, t: Tenant | None, name: str, margin_s: float) -> TenantBuckets:
        windows: list[tuple[SlidingWindow, bool]] = []
        if t is not None and t.rpm:
            windows.append((SlidingWindow(t.rpm, MINUTE_S + margin_s, merge=True), False))
        if t is not None and t.tpm:
            windows.append((SlidingWindow(t.tpm, MINUTE_S + margin_s, merge=True), True))
        return cls(
            name=name,
            weight=t.weight if t else 1.0,
            windows=windows,
            daily_tokens=t.daily_tokens if t else None,
            monthly_budget_usd=t.monthly_budget_usd if t else None,
            daily_budget_usd=t.daily_budget_usd if t else None,
        )

    @property
    def budgeted(self) -> bool:
        """Has a token or money budget: its counters are written through on settlement."""
        return (
            self.daily_tokens is not None
            or self.monthly_budget_usd is not None
            or self.daily_budget_usd is not None
        )

    def roll(self, wall_ms: float) -> None:
        """Start a new day / month of budget when the UTC calendar says so."""
        start, end = self.rolled_day_ms
        if start <= wall_ms < end:
            return
        day = int(wall_ms // (DAY_S * 1000))
        self.rolled_day_ms = (day * DAY_S * 1000.0, (day + 1) * DAY_S * 1000.0)
        if day != self.day_key:
            self.day_key, self.day_used, self.day_used_usd = day, 0, 0.0
            self.alerts_fired = {
                a for a in self.alerts_fired if a[0] not in ("daily_tokens", "daily_usd")
            }
        tm = time.gmtime(wall_ms / 1000)
        month = tm.tm_year * MONTH_KEY_DIVISOR + tm.tm_mon
        if month != self.month_key:
            self.month_key, self.month_used_usd = month, 0.0
            self.alerts_fired = {a for a in self.alerts_fired if a[0] != "monthly_usd"}

    def budget_verdict(self, tokens: int, cost: float) -> str | None:
        """'never' if the ask can't fit this period's budget, 'wait' if in-flight use blocks it."""
        verdict: str | None = None
        if self.daily_tokens is not None:
            if self.day_used + tokens > self.daily_tokens:
                return "never"
            if self.day_used + self.day_reserved + tokens > self.daily_tokens:
                verdict = "wait"
        if self.daily_budget_usd is not None:
            if self.day_used_usd + cost > self.daily_budget_usd:
                return "never"
            if self.day_used_usd + self.day_reserved_usd + cost > self.daily_budget_usd:
                verdict = "wait"
        if self.monthly_budget_usd is not None:
            if self.month_used_usd + cost > self.monthly_budget_usd:
                return "never"
            if self.month_used_usd + self.month_reserved_usd + cost > self.monthly_budget_usd:
                verdict = "wait"
        return verdict

    def fits(self, tokens: int, now: float) -> bool:
        for w, is_tokens in self.windows:  # noqa: SIM110 - a loop: this runs for every ask
            if not w.fits(tokens if is_tokens else 1, now):
                return False
        return True

    def free_at(self, tokens: int, now: float) -> float:
        t = now
        for w, is_tokens in self.windows:
            at = w.free_at(tokens if is_tokens else 1, now)
            t = max(t, at if at is not None else t)
        return t


@dataclass
class _Lease:
    deployment: DeploymentBuckets
    tenant: TenantBuckets
    token_entries: list[tuple[SlidingWindow, Entry]]
    # Entries of this call alone (not day buckets), which a late send can postpone.
    own_entries: list[tuple[SlidingWindow, Entry]]
    # Wall-clock ms at which the entries were recorded (grant + pace).
    recorded_ms: float
    reserved_tokens: int
    reserved_cost: float
    # What our minute windows held right after this grant: the provider's count above
    # that, reported on this call, is someone else's use of the key.
    rpm_used: int
    tpm_used: int
    # Granted while the deployment's breaker was half-open: this call is a probe.
    probe: bool = False
    # The caller reported when the call really left (quantized deployments).
    confirmed: bool = False


@dataclass(slots=True)
class _Waiting:
    ask: Ask
    since: float
    done: bool = False


# One entry of a (priority, tenant) heap: (deadline_ms, arrival seq, the ask). A tuple, so
# that heapq compares in C (the seq is unique: the _Waiting itself is never compared). An
# ask with a deadline has the same tuple in the deadline heap, so expiry removes it from
# its tenant heap by identity.
_HeapEntry = tuple[int, int, _Waiting]


class QuotaBook:
    """Buckets for every deployment and tenant, the fair wait queue, outstanding leases."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], float] = lambda: time.time() * 1000.0,
    ) -> None:
        q = config.quota
        self._margin_s = q.window_margin_ms / 1000.0
        self._clock = clock
        self._wall_ms = wall_ms
        self._queue_max = q.queue_max
        self._freeze_default_s = q.freeze_default_ms / 1000.0
        self._alerts = sorted(q.budget_alerts)
        self.deployments = {
            d.name: DeploymentBuckets.of(
                d,
                self._margin_s,
                q.second_margin_ms / 1000.0,
                float(q.day_bucket_s),
                q.quantized_pace_ms / 1000.0,
                config.resilience.breaker,
            )
            for d in config.deployments
        }
        self._ttft_alpha = q.ttft_ewma_alpha
        self._exhausted_retry_s = q.exhausted_retry_s
        # A grant on a quantized deployment holds its 1 s windows until the caller reports
        # the real send (then they count from it), at most this long: a call that leaves a
        # second late cannot let the next one into the same provider second.
        self._unconfirmed_hold_s = q.unconfirmed_hold_ms / 1000.0
        self._tenant_cfg = {t.name: t for t in config.tenants}
        self.tenants: dict[str, TenantBuckets] = {}
        self._queues: dict[tuple[int, str], list[_HeapEntry]] = {}
        # Asks waiting per tenant, over all priorities (whether a tenant was idle).
        self._tenant_depth: dict[str, int] = {}
        self._deadlines: list[_HeapEntry] = []
        self._depth = 0
        self._seq = itertools.count()
        self._virtual_clock = 0.0
        self._leases: dict[int, _Lease] = {}
        # Lease ids carry a random epoch: settlements for leases of a previous incarnation
        # of this actor can never match a lease of this one.
        self._lease_ids = itertools.count((random.getrandbits(20) << 40) + 1)
        self._ready: dict[str, list[Admitted]] = {}
        self._queued: set[tuple[str, int]] = set()
        self.events: list[dict[str, Any]] = []
        self.grants_total = 0
        # Grants per whole second, for the last RATE_WINDOW_S seconds (status: grants/s).
        self._grant_seconds: deque[list[int]] = deque()
        self.refusals_total = 0
        self.upstream_429s = 0

    # -- tenants -----------------------------------------------------------------------

    def tenant(self, name: str) -> TenantBuckets:
        t = self.tenants.get(name)
        if t is None:
            t = TenantBuckets.of(self._tenant_cfg.get(name), name, self._margin_s)
            t.vtime = self._virtual_clock
            self.tenants[name] = t
        return t

    # -- admission ---------------------------------------------------------------------

    def _retry_exhausted(self, now: float) -> None:
        """Deployments marked exhausted long enough ago get another chance."""
        for d in self.deployments.values():
            if d.exhausted and now - d.exhausted_at >= self._exhausted_retry_s:
                d.exhausted = False
                self.events.append({"event": "deployment_retried", "deployment": d.name})

    def submit(self, asks: Iterable[Ask]) -> list[Decision]:
        """Decide each ask: refused now, or queued and then granted in fair order.

        Asks join the queue even when capacity is free, so newcomers never overtake
        waiting asks of other tenants; the pass right after decides what fits now.
        """
        now = self._clock()
        self._retry_exhausted(now)
        wall = self._wall_ms()
        out: dict[tuple[str, int], Decision] = {}
        order: list[tuple[str, int]] = []
        for ask in asks:
            key = (ask.owner, ask.ticket)
            order.append(key)
            if key in self._queued:
                out[key] = Queued(ask.ticket)  # re-sent after a restart of ours: already waiting
                continue
            refusal = self._refuse_early(ask, now, wall)
            if refusal is not None:
                self.refusals_total += 1
                out[key] = refusal
                continue
            self._enqueue(ask, now)
            out[key] = Queued(ask.ticket)
        for ask, decision in self._admit(now, wall):
            key = (ask.owner, ask.ticket)
            if key in out:
                out[key] = decision
            else:
                self._ready.setdefault(ask.owner, []).append(decision)
        return [out[k] for k in order]

    def _enqueue(self, ask: Ask, now: float) -> None:
        tenant = self.tenant(ask.tenant)
        key = (ask.priority, ask.tenant)
        queue = self._queues.setdefault(key, [])
        waiting = self._tenant_depth.get(ask.tenant, 0)
        if not waiting:
            # A tenant that was idle starts at the virtual clock: no credit banked while away.
            tenant.vtime = max(tenant.vtime, self._virtual_clock)
        self._tenant_depth[ask.tenant] = waiting + 1
        self._queued.add((ask.owner, ask.ticket))
        deadline = _FAR_FUTURE_MS if ask.deadline_ms is None else ask.deadline_ms
        entry: _HeapEntry = (deadline, next(self._seq), _Waiting(ask, now))
        heapq.heappush(queue, entry)
        if ask.deadline_ms is not None:
            heapq.heappush(self._deadlines, entry)
        self._depth += 1

    def _dequeued(self, tenant: str, n: int = 1) -> None:
        """`n` of `tenant`'s asks left the queue (admitted, refused, expired, withdrawn)."""
        self._depth -= n
        self._tenant_depth[tenant] -= n

    @property
    def queue_depth(self) -> int:
        return self._depth

    @property
    def queue_full(self) -> bool:
        return self._depth >= self._queue_max

    def _candidates(self, ask: Ask, now: float) -> list[DeploymentBuckets]:
        """The ask's candidates, or its fallbacks when every candidate is open or exhausted."""
        known = [self.deployments[c] for c in ask.candidates if c in self.deployments]
        if ask.fallback and not any(d.healthy(now) for d in known):
            known += [self.deployments[c] for c in ask.fallback if c in self.deployments]
        return known

    def _refuse_early(self, ask: Ask, now: float, wall: float) -> Refusal | None:
        """Refusals that waiting cannot change, decided before the ask queues."""
        if ask.deadline_ms is not None and ask.deadline_ms <= wall:
            return Refusal(ask.ticket, "deadline_exceeded", "deadline passed before admission")
        known = self._candidates(ask, now)
        if not known:
            return Refusal(ask.ticket, "internal", f"no known deployment in {list(ask.candidates)}")
        live = [d for d in known if not d.exhausted]
        if not live:
            return Refusal(
                ask.ticket,
                "upstream_unavailable",
                f"every deployment of {list(ask.candidates)} reported its credit exhausted "
                "(insufficient_quota)",
            )
        fitting = [d for d in live if d.can_ever_fit(ask.tokens)]
        if not fitting:
            biggest = max(
                (w.limit for d in live for w in d.tokens if id(w) not in d.short), default=0
            )
            return Refusal(
                ask.ticket,
                "request_too_large",
                f"prompt estimate {ask.prompt_tokens} + max_tokens {ask.max_tokens} = "
                f"{ask.tokens} tokens exceeds the largest token limit ({biggest}) of "
                f"deployments {list(ask.candidates)}",
            )
        tenant = self.tenant(ask.tenant)
        tenant.roll(wall)
        # The dearest candidate's price, only where a money budget needs it (hot path).
        priced = tenant.daily_budget_usd is not None or tenant.monthly_budget_usd is not None
        cost = (
            max(_cost(d.price, ask.prompt_tokens, ask.max_tokens) for d in fitting)
            if priced
            else 0.0
        )
        if tenant.budget_verdict(ask.tokens, cost) == "never":
            return Refusal(
                ask.ticket, "quota_exceeded", self._budget_message(tenant, ask.tokens, cost)
            )
        for w, is_tokens in tenant.windows:
            if is_tokens and ask.tokens > w.limit:
                return Refusal(
                    ask.ticket,
                    "request_too_large",
                    f"{ask.tokens} tokens exceed tenant {tenant.name!r}'s tpm limit {w.limit}",
                )
        if ask.deadline_ms is not None:
            earliest = max(
                min(d.free_at(ask.tokens, now) for d in fitting), tenant.free_at(ask.tokens, now)
            )
            wait_ms = (earliest - now) * 1000.0
            if wall + wait_ms > ask.deadline_ms:
                return Refusal(
                    ask.ticket,
                    "deadline_exceeded",
                    f"cannot be admitted before deadline_ms {ask.deadline_ms}: the earliest "
                    f"the limits allow is in {wait_ms:.0f} ms",
                )
        return None

    @staticmethod
    def _budget_message(t: TenantBuckets, tokens: int, cost: float) -> str:
        if t.daily_tokens is not None and t.day_used + tokens > t.daily_tokens:
            return (
                f"tenant {t.name!r} daily token budget: used {t.day_used} of "
                f"{t.daily_tokens}, this request needs up to {tokens}"
            )
        if t.daily_budget_usd is not None and t.day_used_usd + cost > t.daily_budget_usd:
            return (
                f"tenant {t.name!r} daily budget: spent ${t.day_used_usd:.4f} of "
                f"${t.daily_budget_usd} today (UTC), this request may cost up to ${cost:.4f}"
            )
        return (
            f"tenant {t.name!r} monthly budget: spent ${t.month_used_usd:.4f} of "
            f"${t.monthly_budget_usd}, this request may cost up to ${cost:.4f}"
        )

    def _try(
        self, ask: Ask, since: float, now: float, wall: float, blocked: set[str]
    ) -> Admitted | None:
        """Grant `ask` on its first candidate with room, or None to keep it waiting."""
        tenant = self.tenant(ask.tenant)
        tenant.roll(wall)
        tokens = ask.tokens
        if not tenant.fits(tokens, now):
            return None
        for dep in self._candidates(ask, now):
            if dep.name in blocked or not dep.can_ever_fit(tokens):
                continue
            if not dep.fits(tokens, now):
                continue
            cost = _cost(dep.price, ask.prompt_tokens, ask.max_tokens)
            verdict = tenant.budget_verdict(tokens, cost)
            if verdict == "never":
                return Refusal(
                    ask.ticket, "quota_exceeded", self._budget_message(tenant, tokens, cost)
                )
            if verdict == "wait":
                return None
            return self._grant(ask, dep, tenant, cost, now, since)
        return None

    def _grant(
        self,
        ask: Ask,
        dep: DeploymentBuckets,
        tenant: TenantBuckets,
        cost: float,
        now: float,
        since: float,
    ) -> Grant:
        # A quantizing provider sees the call when it is sent: record it then.
        pace = dep.pace_s
        at = now + pace
        tokens = ask.tokens
        short = dep.short
        # The 1 s windows are held until the caller reports the real send (sent_late).
        hold = self._unconfirmed_hold_s
        request_entries = [(w, w.add(1, at, hold if id(w) in short else 0.0)) for w in dep.requests]
        entries = [(w, w.add(tokens, at, hold if id(w) in short else 0.0)) for w in dep.tokens]
        # Only paced calls get a send report, which moves their own entries.
        own = [(w, e) for w, e in (*request_entries, *entries) if w.span_s < DAY_S] if short else []
        for w, is_tokens in tenant.windows:
            e = w.add(tokens if is_tokens else 1, now)
            if is_tokens:
                entries.append((w, e))
        tenant.day_reserved += tokens
        tenant.day_reserved_usd += cost
        tenant.month_reserved_usd += cost
        dep.in_flight += 1
        probe = dep.breaker.state(now) == "half_open"
        dep.breaker.started(now)
        lease = next(self._lease_ids)
        recorded_ms = self._wall_ms() + pace * 1000.0
        self._leases[lease] = _Lease(
            deployment=dep,
            tenant=tenant,
            token_entries=entries,
            own_entries=own,
            recorded_ms=recorded_ms,
            reserved_tokens=ask.tokens,
            reserved_cost=cost,
            rpm_used=dep.rpm.used(now) if dep.rpm else 0,
            tpm_used=dep.tpm.used(now) if dep.tpm else 0,
            probe=probe,
        )
        self.grants_total += 1
        second = int(now)
        if self._grant_seconds and self._grant_seconds[-1][0] == second:
            self._grant_seconds[-1][1] += 1
        else:
            self._grant_seconds.append([second, 1])
            while self._grant_seconds and self._grant_seconds[0][0] <= second - RATE_WINDOW_S:
                self._grant_seconds.popleft()
        self._virtual_clock = max(self._virtual_clock, tenant.vtime)
        tenant.vtime += ask.tokens / tenant.weight
        return Grant(
            ticket=ask.ticket,
            deployment=dep.name,
            lease=lease,
            reserved_tokens=ask.tokens,
            queued_ms=(now - since) * 1000.0,
            # On quantized deployments callers report a send later than this (see sent_late).
            not_before_ms=recorded_ms if dep.short else None,
        )

    def admit_waiting(self) -> int:
        """Grant what fits now, in fair order; returns how many asks were decided."""
        decided = self._admit(self._clock(), self._wall_ms())
        for ask, decision in decided:
            self._ready.setdefault(ask.owner, []).append(decision)
        return len(decided)

    def _admit(self, now: float, wall: float) -> list[tuple[Ask, Admitted]]:
        out: list[tuple[Ask, Admitted]] = self._expire_deadlines(wall)
        if not self._depth:
            return out
        blocked: set[str] = set()
        for prio in sorted({p for (p, _), q in self._queues.items() if q}):
            while True:
                tenants = [t for (p, t), q in self._queues.items() if p == prio and q]
                tenants.sort(key=lambda name: self.tenants[name].vtime)
                # Alone at its priority, a tenant keeps the turn: there is no order to
                # recompute after each grant (that was most of a batch's overhead).
                alone = len(tenants) == 1
                progressed = False
                for name in tenants:
                    queue = self._queues[(prio, name)]
                    while queue:
                        head = queue[0][2]
                        decision = self._try(head.ask, head.since, now, wall, blocked)
                        if decision is None:
                            # Hold its deployments for it: nothing behind may take their room.
                            blocked.update(head.ask.candidates)
                            break
                        heapq.heappop(queue)
                        head.done = True
                        self._dequeued(name)
                        self._queued.discard((head.ask.owner, head.ask.ticket))
                        if isinstance(decision, Refusal):
                            self.refusals_total += 1
                        out.append((head.ask, decision))
                        progressed = True
                        if not alone:
                            break
                    if progressed:
                        break  # virtual times moved: pick the next tenant afresh
                if not progressed:
                    break
        return out

    def _expire_deadlines(self, wall: float) -> list[tuple[Ask, Admitted]]:
        out: list[tuple[Ask, Admitted]] = []
        touched: set[tuple[int, str]] = set()
        while self._deadlines and self._deadlines[0][0] <= wall:
            w = heapq.heappop(self._deadlines)[2]
            if w.done:
                continue
            w.done = True
            self._queued.discard((w.ask.owner, w.ask.ticket))
            touched.add((w.ask.priority, w.ask.tenant))
            self._dequeued(w.ask.tenant)
            self.refusals_total += 1
            out.append(
                (
                    w.ask,
                    Refusal(
                        w.ask.ticket, "deadline_exceeded", "deadline passed while waiting for quota"
                    ),
                )
            )
        # The expired leave their tenant heaps in one pass per heap, however many expired
        # (removing each on its own was a scan and a heapify per expiry).
        for key in touched:
            queue = self._queues[key]
            queue[:] = [e for e in queue if not e[2].done]
            heapq.heapify(queue)
        return out

    def cancel(self, owner: str, tickets: Iterable[int]) -> int:
        """Withdraw `owner`'s asks for `tickets`: waiting ones leave the queue, grants made
        but not yet taken are given back unused. Returns how many were withdrawn."""
        drop = {(owner, t) for t in tickets}
        withdrawn = 0
        for key, queue in self._queues.items():
            kept: list[_HeapEntry] = []
            for entry in queue:
                w = entry[2]
                if (w.ask.owner, w.ask.ticket) in drop:
                    w.done = True  # its deadline entry is skipped from now on
                else:
                    kept.append(entry)
            if len(kept) == len(queue):
                continue
            withdrawn += len(queue) - len(kept)
            self._dequeued(key[1], len(queue) - len(kept))
            heapq.heapify(kept)
            self._queues[key] = kept
        self._queued -= drop
        ready = self._ready.get(owner, [])
        gone = [d for d in ready if (owner, d.ticket) in drop]
        if gone:
            self._ready[owner] = [d for d in ready if (owner, d.ticket) not in drop]
            self.settle(
                Settlement(g.lease, 0, deployment=g.deployment, outcome="unused")
                for g in gone
                if isinstance(g, Grant)
            )
        return withdrawn + len(gone)

    def take(self, owner: str) -> list[Admitted]:
        """Decisions for `owner`'s queued asks made since the last call."""
        return self._ready.pop(owner, [])

    def next_wake(self) -> float | None:
        """When a queued head could next fit by time alone; None if nothing waits."""
        if not self._depth:
            return None
        now = self._clock()
        best: float | None = None
        for queue in self._queues.values():
            if not queue:
                continue
            ask = queue[0][2].ask
            tenant_at = self.tenant(ask.tenant).free_at(ask.tokens, now)
            for dep in self._candidates(ask, now):
                if dep.exhausted or not dep.can_ever_fit(ask.tokens):
                    continue
                at = max(dep.free_at(ask.tokens, now), tenant_at)
                best = at if best is None else min(best, at)
        if self._deadlines:
            deadline_in = (self._deadlines[0][0] - self._wall_ms()) / 1000.0
            best = (
                now + max(0.0, deadline_in)
                if best is None
                else min(best, now + max(0.0, deadline_in))
            )
        return best

    # -- reconciliation ------------------------------------------------------------------

    def settle(self, settlements: Iterable[Settlement]) -> set[str]:
        """Return leases: correct token entries and budgets to real use, learn from headers.

        Returns the tenants with a budget whose counters changed (to be made durable at
        once); the others' use is in the periodic checkpoint, like the deployments' windows.
        """
        now = self._clock()
        wall = self._wall_ms()
        touched: set[str] = set()
        for s in settlements:
            lease = self._leases.pop(s.lease, None)
            if lease is None:
                # A lease of an earlier incarnation: its concurrency slot comes back, and
                # its use counts for the tenant. If the checkpoint already counted its
                # reservation as spent this counts twice: budgets err on the safe side.
                dep_old = self.deployments.get(s.deployment)
                if dep_old is not None and dep_old.inherited_in_flight > 0:
                    dep_old.inherited_in_flight -= 1
                    dep_old.in_flight = max(0, dep_old.in_flight - 1)
                if s.tenant:
                    t = self.tenant(s.tenant)
                    t.roll(wall)
                    t.day_used += s.used_tokens
                    if dep_old is not None:
                        spent = _cost(
                            dep_old.price, s.prompt_tokens, s.completion_tokens, s.cached_tokens
                        )
                        t.month_used_usd += spent
                        t.day_used_usd += spent
                    if t.budgeted:
                        touched.add(t.name)
                continue
            dep, tenant = lease.deployment, lease.tenant
            self._release_hold(lease, now)
            dep.in_flight = max(0, dep.in_flight - 1)
            delta = s.used_tokens - lease.reserved_tokens
            for w, entry in lease.token_entries:
                w.adjust(entry, delta, now)
            tenant.roll(wall)
            tenant.day_reserved = max(0, tenant.day_reserved - lease.reserved_tokens)
            tenant.month_reserved_usd = max(0.0, tenant.month_reserved_usd - lease.reserved_cost)
            tenant.day_reserved_usd = max(0.0, tenant.day_reserved_usd - lease.reserved_cost)
            tenant.day_used += s.used_tokens
            spent = _cost(dep.price, s.prompt_tokens, s.completion_tokens, s.cached_tokens)
            tenant.month_used_usd += spent
            tenant.day_used_usd += spent
            if tenant.budgeted:
                touched.add(tenant.name)
            self._check_alerts(tenant, wall)
            self._judge(lease, s, now)
            if s.observed is not None:
                self._observe(lease, s.observed, now)
        return touched

    def _judge(self, lease: _Lease, s: Settlement, now: float) -> None:
        """Feed the deployment's breaker and latency estimate with one call's outcome."""
        dep = lease.deployment
        if s.outcome not in ("ok", "failed"):
            dep.breaker.release(now, probe=lease.probe)
            return
        dep.breaker.record(s.outcome == "failed", now, probe=lease.probe)
        self._report_breaker(dep, now)
        if s.outcome == "ok" and s.ttft_ms is not None:
            a = self._ttft_alpha
            prev = dep.ttft_ewma_ms
            dep.ttft_ewma_ms = s.ttft_ms if prev is None else a * s.ttft_ms + (1 - a) * prev

    def sent_late(self, reports: Iterable[tuple[int, float]]) -> None:
        """(lease, wall ms it was really sent): its entries count from then.

        Callers report every send on quantized deployments (late ones at once): the 1 s
        windows, held since the grant, now expire a second after the real send; the
        longer ones move by the delay."""
        now = self._clock()
        for lease_id, sent_ms in reports:
            lease = self._leases.get(lease_id)
            if lease is None or lease.confirmed:
                continue
            lease.confirmed = True
            delay_s = (sent_ms - lease.recorded_ms) / 1000.0
            short = lease.deployment.short
            for w, entry in lease.own_entries:
                if id(w) in short:
                    # Recorded at `opened_at` (the planned send), really sent delay_s later.
                    w.expire_at(entry, entry.opened_at + w.span_s + max(0.0, delay_s), now)
                else:
                    w.postpone(entry, delay_s, now)
            lease.recorded_ms = max(lease.recorded_ms, sent_ms)

    def _release_hold(self, lease: _Lease, now: float) -> None:
        """A lease settled without a send report: its 1 s windows count as sent now."""
        if lease.confirmed or not lease.deployment.short:
            return
        for w, entry in lease.own_entries:
            if id(w) in lease.deployment.short:
                w.expire_at(entry, now + w.span_s, now)

    def _observe(self, lease: _Lease, obs: Observation, now: float) -> None:
        dep = lease.deployment
        if obs.refused == "exhausted":
            dep.exhausted = True
            dep.exhausted_at = now
            self.events.append({"event": "deployment_exhausted", "deployment": dep.name})
        elif obs.refused == "rate_limited":
            dep.upstream_429s += 1
            self.upstream_429s += 1
            wait_s = _freeze_s(obs, self._freeze_default_s)
            dep.frozen_until = max(dep.frozen_until, now + wait_s)
            self.events.append(
                {"event": "upstream_429", "deployment": dep.name, "frozen_s": wait_s}
            )
        if dep.rpm is not None:
            dep.rpm.tighten(
                obs.limit_requests,
                obs.remaining_requests,
                lease.rpm_used,
                obs.reset_requests_s or 0.0,
                now,
            )
        if dep.tpm is not None:
            dep.tpm.tighten(
                obs.limit_tokens,
                obs.remaining_tokens,
                lease.tpm_used,
                obs.reset_tokens_s or 0.0,
                now,
            )

    def _check_alerts(self, t: TenantBuckets, wall: float) -> None:
        if not t.budgeted:
            return
        checks: list[tuple[str, float, float | None]] = [
            ("daily_tokens", float(t.day_used), float(t.daily_tokens) if t.daily_tokens else None),
            ("daily_usd", t.day_used_usd, t.daily_budget_usd),
            ("monthly_usd", t.month_used_usd, t.monthly_budget_usd),
        ]
        for budget, used, limit in checks:
            if not limit:
                continue
            for ratio in self._alerts:
                if used >= ratio * limit and (budget, ratio) not in t.alerts_fired:
                    t.alerts_fired.add((budget, ratio))
                    self.events.append(
                        {
                            "event": "budget_crossed",
                            "tenant": t.name,
                            "budget": budget,
                            "ratio": ratio,
                            "used": round(used, 6),
                            "limit": limit,
                            "ts_ms": int(wall),
                        }
                    )

    def drain_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events

    # -- durability ----------------------------------------------------------------------

    def checkpoint(self, tenants: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """State keyed for a compacted topic: everything, or only the named tenants."""
        now, wall = self._clock(), self._wall_ms()
        out: dict[str, dict[str, Any]] = {}
        only = None if tenants is None else set(tenants)
        for name, d in self.deployments.items() if only is None else ():
            out[f"deployment:{name}"] = {
                "ts_ms": wall,
                "signature": [w.signature() for w in d.windows],
                "windows": [w.dump(now) for w in d.windows],
                "used": [w.used(now) for w in d.windows],
                "in_flight": d.in_flight,
                "exhausted": d.exhausted,
            }
        for name, t in self.tenants.items():
            if only is not None and name not in only:
                continue
            out[f"tenant:{name}"] = {
                "ts_ms": wall,
                "signature": [w.signature() for w, _ in t.windows],
                "windows": [w.dump(now) for w, _ in t.windows],
                "used": [w.used(now) for w, _ in t.windows],
                "day_key": t.day_key,
                "day_used": t.day_used + t.day_reserved,
                "day_used_usd": t.day_used_usd + t.day_reserved_usd,
                "month_key": t.month_key,
                "month_used_usd": t.month_used_usd + t.month_reserved_usd,
                "alerts": sorted([list(a) for a in t.alerts_fired]),
            }
        return out

    def restore(self, records: dict[str, dict[str, Any]]) -> None:
        """Start from checkpoints, conservatively (Doorman's learning mode).

        Grants made after the last checkpoint are unknown, so each window also holds the
        rest of its capacity (at most what one checkpoint interval can hide) for one span:
        no bucket starts fuller than it was. In-flight reservations count as spent.
        """
        now, wall = self._clock(), self._wall_ms()
        for key, rec in records.items():
            kind, _, name = key.partition(":")
            elapsed_s = max(0.0, (wall - float(rec.get("ts_ms", wall))) / 1000.0)
            if kind == "deployment" and name in self.deployments:
                d = self.deployments[name]
                self._restore_windows(d.windows, d.hidden_caps(elapsed_s), rec, elapsed_s, now)
                d.in_flight = d.inherited_in_flight = int(rec.get("in_flight", 0))
                d.exhausted = bool(rec.get("exhausted", False))
                d.exhausted_at = now
            elif kind == "tenant":
                t = self.tenant(name)
                windows = [w for w, _ in t.windows]
                self._restore_windows(windows, [w.limit for w in windows], rec, elapsed_s, now)
                t.roll(wall)
                if rec.get("day_key") == t.day_key:
                    t.day_used = int(rec.get("day_used", 0))
                    t.day_used_usd = float(rec.get("day_used_usd", 0.0))
                if rec.get("month_key") == t.month_key:
                    t.month_used_usd = float(rec.get("month_used_usd", 0.0))
                t.alerts_fired = {(str(a[0]), float(a[1])) for a in rec.get("alerts", [])}

    @staticmethod
    def _restore_windows(
        windows: list[SlidingWindow],
        caps: list[int],
        rec: dict[str, Any],
        elapsed_s: float,
        now: float,
    ) -> None:
        same = [list(s) for s in rec.get("signature", [])] == [list(w.signature()) for w in windows]
        for i, w in enumerate(windows):
            used_then = 0
            if same:
                w.restore([(ttl - elapsed_s, amount) for ttl, amount in rec["windows"][i]], now)
                used_then = int(rec["used"][i])
            hidden = caps[i] if same else w.limit
            w.hold(min(hidden, max(0, w.limit - used_then)), now + w.span_s, now)

    # -- visibility ----------------------------------------------------------------------

    def headroom(self) -> dict[str, float]:
        now = self._clock()
        return {name: d.headroom(now) for name, d in self.deployments.items()}

    def _report_breaker(self, dep: DeploymentBuckets, now: float) -> None:
        """An event for each breaker state not yet published (open -> half-open happens
        by time alone, so it is noticed at the next settlement or state refresh)."""
        state = dep.breaker.state(now)
        if state != dep.breaker_reported:
            dep.breaker_reported = state
            self.events.append({"event": f"breaker_{state}", "deployment": dep.name})

    def routing_state(self) -> dict[str, DeploymentState]:
        now = self._clock()
        for d in self.deployments.values():
            self._report_breaker(d, now)
        return {
            name: DeploymentState(
                headroom=d.headroom(now),
                breaker=d.breaker.state(now),
                ttft_ewma_ms=None if d.ttft_ewma_ms is None else round(d.ttft_ewma_ms, 3),
                frozen=now < d.frozen_until,
                exhausted=d.exhausted,
            )
            for name, d in self.deployments.items()
        }

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        deps: dict[str, Any] = {}
        for name, d in self.deployments.items():
            buckets: dict[str, Any] = {}
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
            buckets["frozen_s"] = round(max(0.0, d.frozen_until - now), 3)
            buckets["exhausted"] = d.exhausted
            buckets["upstream_429s"] = d.upstream_429s
            buckets["breaker"] = d.breaker.snapshot(now)
            buckets["ttft_ewma_ms"] = None if d.ttft_ewma_ms is None else round(d.ttft_ewma_ms, 3)
            deps[name] = buckets
        queue: dict[str, dict[str, int]] = {}
        for (prio, tenant), q in self._queues.items():
            if q:
                queue.setdefault(tenant, {})[str(prio)] = len(q)
        tenants = {
            name: {
                "day_used_tokens": t.day_used,
                "daily_tokens": t.daily_tokens,
                "day_used_usd": round(t.day_used_usd, 6),
                "daily_budget_usd": t.daily_budget_usd,
                "month_used_usd": round(t.month_used_usd, 6),
                "monthly_budget_usd": t.monthly_budget_usd,
                "weight": t.weight,
            }
            for name, t in self.tenants.items()
        }
        return {
            "deployments": deps,
            "tenants": tenants,
            "queue_depth": self._depth,
            "queue_by_tenant_priority": queue,
            "queue_by_tenant": {t: sum(v.values()) for t, v in queue.items()},
            "leases": len(self._leases),
            "grants_total": self.grants_total,
            "grants_per_s": round(
                sum(n for s, n in self._grant_seconds if s > int(now) - RATE_WINDOW_S)
                / RATE_WINDOW_S,
                3,
            ),
            "refusals_total": self.refusals_total,
            "upstream_429s": self.upstream_429s,
        }
