"""Single flight: identical cacheable requests in flight together make one upstream call.

The cache shard of a key is the coordinator (one key, one shard, whichever ingress
replica a request came through). Per lookup item the shard answers:

- **hit**: answered from cache (replayed to the item's reply topic);
- **leader**: a miss and nobody runs this key: the ingress sends it upstream, and its
  caller reports the result with `put_many` (the entry, or `failed=True`);
- **follower**: a miss while a leader runs the key: the ingress holds it. When the
  leader's entry arrives the shard replays it to every follower (to each one's own
  `reply_to` and id) and reports them **answered**; when the leader ended without a
  storable answer, was abandoned by its ingress (answered there without a call: a
  refusal, a passed deadline) or ran past `cache.single_flight_timeout_s`, the shard
  reports them **run**: the ingress sends them upstream itself.

The ingress learns of answered and released followers through a long poll
(`CacheShard.flight_news`, as `Caller.finished`), and counts a follower finished only once
the shard reported it answered (its replies acknowledged by Kafka). With each poll it
reports its leaders that ended without a call (`gone`) and followers it no longer waits
for (`dropped`). Every answer carries the shard's incarnation: followers registered with
an earlier incarnation died with it, and run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from actors._messages import CacheLookup

__all__ = [
    "Digest",
    "Flight",
    "FlightNews",
    "FlightWatch",
    "Flights",
    "Follower",
    "Looked",
    "Outbox",
    "Rerun",
]


class Rerun(msgspec.Struct, frozen=True):
    """A replay that failed part way: run the request, from `next_seq` with a reset."""

    ticket: int
    next_seq: int


class Looked(msgspec.Struct, frozen=True):
    """A shard's answer to one `lookup` call; tickets in none of the lists are leaders."""

    incarnation: str
    answered: list[int] = msgspec.field(default_factory=list)
    followers: list[int] = msgspec.field(default_factory=list)
    rerun: list[Rerun] = msgspec.field(default_factory=list)


class FlightNews(msgspec.Struct, frozen=True):
    """What happened to one ingress's followers since its last poll."""

    incarnation: str
    answered: list[int] = msgspec.field(default_factory=list)
    run: list[int] = msgspec.field(default_factory=list)
    rerun: list[Rerun] = msgspec.field(default_factory=list)


@dataclass
class Follower:
    owner: str
    item: CacheLookup


@dataclass
class Flight:
    """One key being answered upstream: its leader, who waits, and what the shard keeps
    to index the answer semantically when it arrives (from the leader's lookup)."""

    owner: str
    ticket: int
    started: float
    model: str
    followers: list[Follower] = field(default_factory=list)
    scope: str | None = None
    text: str | None = None
    vector: Any = None


class Flights:
    """The shard's flights by key (plain logic; the clock is injectable for tests)."""

    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s = timeout_s
        self._clock = clock
        self._by_key: dict[str, Flight] = {}
        self.led = 0
        self.followed = 0
        self.timed_out = 0
        self.abandoned = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    @property
    def waiting(self) -> int:
        return sum(len(f.followers) for f in self._by_key.values())

    def join(self, owner: str, item: CacheLookup) -> Flight | None:
        """Follow the flight of `item.key` (returns None), or lead a new one (returns it)."""
        flight = self._by_key.get(item.key)
        if flight is not None:
            flight.followers.append(Follower(owner, item))
            self.followed += 1
            return None
        flight = Flight(owner, item.ticket, self._clock(), item.model)
        self._by_key[item.key] = flight
        self.led += 1
        return flight

    def land(self, key: str) -> Flight | None:
        """The answer for `key` arrived (stored or not): the flight is over."""
        return self._by_key.pop(key, None)

    def abandon(self, key: str, owner: str, ticket: int) -> Flight | None:
        """The leader's ingress answered it without a call: no answer will come."""
        flight = self._by_key.get(key)
        if flight is None or (flight.owner, flight.ticket) != (owner, ticket):
            return None  # landed already, or a newer flight of the same key
        self.abandoned += 1
        return self._by_key.pop(key)

    def drop(self, owner: str, tickets: set[int]) -> None:
        """Followers `owner` no longer waits for (answered otherwise)."""
        for flight in self._by_key.values():
            flight.followers = [
                f for f in flight.followers if f.owner != owner or f.item.ticket not in tickets
            ]

    def expire(self) -> list[Flight]:
        """Flights older than the timeout, ended (their followers run themselves)."""
        limit = self._clock() - self._timeout_s
        old = [k for k, f in self._by_key.items() if f.started < limit]
        self.timed_out += len(old)
        return [self._by_key.pop(k) for k in old]

    def stats(self) -> dict[str, Any]:
        return {
            "flights": len(self._by_key),
            "followers_waiting": self.waiting,
            "flights_led": self.led,
            "flights_followed": self.followed,
            "flights_timed_out": self.timed_out,
            "flights_abandoned": self.abandoned,
        }


class Outbox:
    """Per ingress: followers answered or released since its last poll (a long poll)."""

    def __init__(self) -> None:
        self._news: dict[str, tuple[list[int], list[int], list[Rerun]]] = {}
        self._events: dict[str, asyncio.Event] = {}

    def _slot(self, owner: str) -> tuple[list[int], list[int], list[Rerun]]:
        return self._news.setdefault(owner, ([], [], []))

    def _wake(self, owner: str) -> None:
        ev = self._events.get(owner)
        if ev is not None:
            ev.set()

    def answered(self, owner: str, ticket: int) -> None:
        self._slot(owner)[0].append(ticket)
        self._wake(owner)

    def run(self, owner: str, ticket: int) -> None:
        self._slot(owner)[1].append(ticket)
        self._wake(owner)

    def rerun(self, owner: str, rerun: Rerun) -> None:
        self._slot(owner)[2].append(rerun)
        self._wake(owner)

    def release(self, flight: Flight) -> None:
        """Every follower of `flight` runs itself."""
        for f in flight.followers:
            self.run(f.owner, f.item.ticket)

    async def wait(self, owner: str, timeout_s: float, incarnation: str) -> FlightNews:
        """`owner`'s news, waiting up to `timeout_s` for some."""
        if owner not in self._news:
            ev = self._events.setdefault(owner, asyncio.Event())
            ev.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout_s)
        answered, run, rerun = self._news.pop(owner, ([], [], []))
        return FlightNews(incarnation, answered, run, rerun)


class _Dispatchable(Protocol):
    """The part of the ingress's per-request state the watch reads."""

    caller: int | None


@dataclass
class Digest:
    """News for the ingress to act on: finish `answered`; send `run` upstream; move the
    seq of each of `rerun` on (with a reset), then send it upstream too."""

    answered: list[int] = field(default_factory=list)
    run: list[int] = field(default_factory=list)
    rerun: list[Rerun] = field(default_factory=list)

    def add(self, ticket: int, kind: str, rerun: Rerun | None) -> None:
        if rerun is not None:
            self.rerun.append(rerun)
        elif kind == "answered":
            self.answered.append(ticket)
        else:
            self.run.append(ticket)


class FlightWatch:
    """The ingress side: its leaders and followers per shard (plain logic).

    `running` is the ingress's map of running tickets; a leader is looked at only after
    its ticket left it, through the object it was registered with (`caller` still set:
    a caller ran it and reports its result; None: nobody called upstream for it).
    News of a follower may arrive (through the long poll) before the lookup reply that
    made it one is handled: it is kept until the follower is registered.
    """

    def __init__(self) -> None:
        self._leaders: dict[int, dict[int, tuple[str, _Dispatchable]]] = {}
        # shard -> follower ticket -> the shard incarnation it was registered with
        self._followers: dict[int, dict[int, str]] = {}
        self._early: dict[int, dict[int, tuple[str, Rerun | None]]] = {}
        self.started = False

    def lead(self, shard: int, ticket: int, key: str, pending: _Dispatchable) -> None:
        self._leaders.setdefault(shard, {})[ticket] = (key, pending)

    def follow(self, shard: int, incarnation: str, tickets: list[int]) -> Digest:
        """Register followers; returns the news that already came for some of them."""
        held = self._followers.setdefault(shard, {})
        early = self._early.get(shard, {})
        out = Digest()
        for t in tickets:
            news = early.pop(t, None)
            if news is None:
                held[t] = incarnation
            else:
                out.add(t, *news)
        return out

    def followers(self, shard: int) -> int:
        return len(self._followers.get(shard, {}))

    def following(self) -> set[int]:
        """Every follower ticket, of any shard (a shard will answer them)."""
        return {t for held in self._followers.values() for t in held}

    def report(
        self, shard: int, running: Container[int]
    ) -> tuple[list[tuple[str, int]], list[int]]:
        """(leaders gone without a call, followers no longer waited for) since the last
        report; `running` is the ingress's ticket -> request map."""
        gone: list[tuple[str, int]] = []
        leaders = self._leaders.get(shard, {})
        for t in [t for t in leaders if t not in running]:
            key, p = leaders.pop(t)
            if p.caller is None:
                gone.append((key, t))
        held = self._followers.get(shard, {})
        dropped = [t for t in held if t not in running]
        for t in dropped:
            del held[t]
        early = self._early.get(shard, {})
        for t in [t for t in early if t not in running]:
            del early[t]
        return gone, dropped

    def digest(self, shard: int, news: FlightNews, running: Container[int]) -> Digest:
        """What a poll's news means for the followers this ingress holds; followers
        registered with another incarnation than the news' died with it: they run."""
        out = Digest()
        items: list[tuple[int, str, Rerun | None]] = [
            *((t, "answered", None) for t in news.answered),
            *((t, "run", None) for t in news.run),
            *((r.ticket, "rerun", r) for r in news.rerun),
        ]
        held = self._followers.setdefault(shard, {})
        for t, kind, rerun in items:
            if held.pop(t, None) is not None:
                out.add(t, kind, rerun)
            elif t in running:  # its lookup reply is still on its way
                self._early.setdefault(shard, {})[t] = (kind, rerun)
        out.run.extend(self.lost(shard, news.incarnation))
        return out

    def lost(self, shard: int, incarnation: str | None) -> list[int]:
        """Followers registered with another incarnation of the shard (None: any): they
        died with it. Removed from the watch."""
        held = self._followers.get(shard, {})
        gone = [t for t, inc in held.items() if incarnation is None or inc != incarnation]
        for t in gone:
            del held[t]
        return gone
