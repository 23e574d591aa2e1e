"""Sliding-window logs: the bucket shape that can never over-admit against a provider.

Providers count the last 60 s (some also quantize to 1 s). A log of (time, amount)
entries that expire `span` after they were granted admits exactly what a sliding window
admits; the span includes a margin for the grant-to-provider delay, so the provider's own
window never sees more than the limit. A token bucket with burst = limit would allow up to
twice the limit inside one provider window; a fixed minute allows a double burst at the
boundary. Long windows (a day) aggregate entries into buckets: a bucket expires `span`
after its *end*, which keeps them conservative.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

__all__ = ["Entry", "SlidingWindow"]

# Checkpoints sum a window's entries per this much of expiry: a minute window at thousands
# of grants a second dumps ~600 pairs instead of one per grant (the dump was 16% of the
# quota actor's time at 15k grants/s). The sums are kept as entries change, not summed at
# each checkpoint: a minute's entries were walked once a second (12% of the actor's time).
_DUMP_STEP_S: Final = 0.1


def _step(expires_at: float) -> int:
    """The dump step an expiry falls in (rounded up: never earlier than the entry)."""
    return math.ceil(expires_at / _DUMP_STEP_S)


class Entry:
    """One admission (or one bucket of them); its amount can be corrected later."""

    __slots__ = ("amount", "expires_at", "opened_at")

    def __init__(self, opened_at: float, expires_at: float, amount: int) -> None:
        self.opened_at = opened_at
        self.expires_at = expires_at
        self.amount = amount


class SlidingWindow:
    """Sum of amounts admitted in the last `span_s` seconds, against `limit`.

    `limit` may be tightened at run time (`tighten`) from what the provider reports; it is
    never raised above the configured value. `external` is usage the provider reports
    that we did not grant (another client on the same key), held until it resets.
    """

    __slots__ = (
        "_bucket_s",
        "_entries",
        "_external",
        "_external_until",
        "_merge",
        "_steps",
        "_used",
        "configured_limit",
        "limit",
        "span_s",
    )

    def __init__(
        self, limit: int, span_s: float, *, bucket_s: float = 0.0, merge: bool = False
    ) -> None:
        self.configured_limit = limit
        self.limit = limit
        self.span_s = span_s
        self._bucket_s = bucket_s
        # Admissions at the very same instant share one entry (a batch is granted at one
        # `now`): one object per batch instead of per grant. Only for windows whose entries
        # are never moved earlier one by one (not the quantized 1 s windows).
        self._merge = merge
        self._entries: deque[Entry] = deque()
        # Live amount per dump step of expiry (see `dump`).
        self._steps: dict[int, int] = {}
        self._used = 0
        self._external = 0
        self._external_until = 0.0

    def _expire(self, now: float) -> None:
        entries = self._entries
        if entries and entries[0].expires_at <= now:
            steps = self._steps
            while entries and entries[0].expires_at <= now:
                e = entries.popleft()
                self._used -= e.amount
                # `_shift(e.expires_at, -e.amount)`, inlined: this runs for every expiry.
                k = math.ceil(e.expires_at / _DUMP_STEP_S)
                left = steps.get(k, 0) - e.amount
                if left > 0:
                    steps[k] = left
                else:
                    steps.pop(k, None)
        if self._external and self._external_until <= now:
            self._external = 0

    def used(self, now: float) -> int:
        self._expire(now)
        return self._used + self._external

    def remaining(self, now: float) -> int:
        return max(0, self.limit - self.used(now))

    def fits(self, amount: int, now: float) -> bool:
        return self.used(now) + amount <= self.limit

    def fits_or_empty(self, amount: int, now: float) -> bool:
        """Fits, or the window is empty: a request bigger than a short window's limit can
        still pass alone (providers quantizing per second admit it into an empty second)."""
        used = self.used(now)
        return used + amount <= self.limit or used == 0

    def add(self, amount: int, now: float, hold_s: float = 0.0) -> Entry:
        """Record an admission at `now` (callers check `fits` first); `hold_s` expires it
        that much later (as `postpone` would, without moving it after the fact)."""
        entries = self._entries
        last = entries[-1] if entries else None
        # A held entry is never shared: it is later moved on its own (`expire_at`).
        if (
            not hold_s
            and last is not None
            and (
                (self._bucket_s and now < last.opened_at + self._bucket_s)
                # Same instant, and it expires no earlier than a new entry would (a restored
                # entry may expire sooner): sharing it never releases this admission early.
                or (self._merge and now == last.opened_at and last.expires_at >= now + self.span_s)
            )
        ):
            entry = last
            entry.amount += amount
        else:
            entry = Entry(now, now + self._bucket_s + self.span_s + hold_s, amount)
            entries.append(entry)
        self._used += amount
        # `_shift(entry.expires_at, amount)`, inlined: this runs for every grant.
        k = math.ceil(entry.expires_at / _DUMP_STEP_S)
        self._steps[k] = self._steps.get(k, 0) + amount
        return entry

    def _shift(self, expires_at: float, delta: int) -> None:
        """Add `delta` to the live amount of the dump step `expires_at` falls in."""
        k = _step(expires_at)
        left = self._steps.get(k, 0) + delta
        if left > 0:
            self._steps[k] = left
        else:
            self._steps.pop(k, None)

    def _move(self, entry: Entry, expires_at: float) -> None:
        self._shift(entry.expires_at, -entry.amount)
        entry.expires_at = expires_at
        self._shift(expires_at, entry.amount)

    def adjust(self, entry: Entry, delta: int, now: float) -> None:
        """Correct an entry by `delta` (real usage minus reserved); a no-op once expired."""
        self._expire(now)
        if entry.expires_at > now:
            delta = max(delta, -entry.amount)
            entry.amount += delta
            self._used += delta
            self._shift(entry.expires_at, delta)

    def postpone(self, entry: Entry, delay_s: float, now: float) -> None:
        """The admission reached the provider `delay_s` later than recorded: it expires no
        earlier than `delay_s` after its recorded expiry.

        An entry shared by admissions of one instant takes the latest of their delays (not
        their sum). Entries then may sit out of expiry order; expiry from the left keeps
        them longer, never shorter, so the window only errs on the safe side.
        """
        if delay_s > 0 and entry.expires_at > now:
            at = entry.opened_at + self._bucket_s + self.span_s + delay_s
            if at > entry.expires_at:
                self._move(entry, at)

    def expire_at(self, entry: Entry, at: float, now: float) -> None:
        """Let a held entry expire at `at` (earlier or later than it would have).

        An entry moved earlier behind one that expires later still waits for it (expiry
        is from the left): the window only errs on the safe side.
        """
        if entry.expires_at > now:
            self._move(entry, max(at, now))

    def free_at(self, amount: int, now: float) -> float | None:
        """Earliest time `amount` fits, if nothing else is added; None if it never can."""
        if amount > self.limit:
            return None
        excess = self.used(now) + amount - self.limit
        if excess <= 0:
            return now
        at = now
        if self._external:
            excess -= self._external
            at = self._external_until
            if excess <= 0:
                return at
        for entry in self._entries:
            excess -= entry.amount
            if excess <= 0:
                return max(at, entry.expires_at)
        return at

    def reset_at(self, now: float) -> float:
        """When the window will be empty again (for status, like `x-ratelimit-reset-*`)."""
        self._expire(now)
        last = self._entries[-1].expires_at if self._entries else now
        return max(last, self._external_until if self._external else now)

    def tighten(
        self,
        provider_limit: int | None,
        provider_remaining: int | None,
        own_used: int,
        reset_s: float,
        now: float,
    ) -> bool:
        """Learn from `x-ratelimit-*`: only ever lowers the limit or adds external usage.

        `own_used` is what this window held right after the observed call was granted; the
        provider's count above that is someone else's use of the same key.
        """
        changed = False
        if provider_limit is not None and 0 < provider_limit < self.limit:
            self.limit = provider_limit
            changed = True
        if provider_remaining is not None:
            provider_used = self.limit - provider_remaining
            foreign = provider_used - own_used
            if foreign > 0:
                self._expire(now)
                until = now + max(reset_s, 0.0)
                if foreign > self._external or until > self._external_until:
                    self._external = max(self._external, foreign)
                    self._external_until = max(self._external_until, until)
                    changed = True
        return changed

    def hold(self, amount: int, until: float, now: float) -> None:
        """Count `amount` as used until `until` (usage we cannot see, e.g. after a restart)."""
        self._expire(now)
        if amount > 0 and until > now:
            self._external = max(self._external, amount)
            self._external_until = max(self._external_until, until)

    def signature(self) -> tuple[int, float]:
        return (self.configured_limit, self.span_s)

    def dump(self, now: float) -> list[tuple[float, int]]:
        """(seconds until expiry, amount) of the live entries, summed per `_DUMP_STEP_S` of
        expiry (rounded up: a restored window is never emptier than the saved one)."""
        self._expire(now)
        out = [(k * _DUMP_STEP_S - now, amount) for k, amount in sorted(self._steps.items())]
        if self._external:
            out.append((self._external_until - now, self._external))
        return out

    def restore(self, items: list[tuple[float, int]], now: float) -> None:
        """Re-create entries from `dump` (relative expiries survive a clock change)."""
        for ttl, amount in items:
            if ttl > 0 and amount > 0:
                self._entries.append(Entry(now, now + ttl, amount))
                self._used += amount
                self._shift(now + ttl, amount)
        ordered = sorted(self._entries, key=lambda e: e.expires_at)
        self._entries = deque(ordered)
