"""PinBudget: the program pins held, what each is still worth, and how much of each tier they may hold.

Why a ledger beside the store's own pins: the store knows handles and expiries; deciding
which pin gives way needs what a pin was judged worth (its saving, its memory ratio, its
tool's duration CDF) and whose it is. Values change as pins age: a pin's value now is

    P(tool returns before expiry | not returned yet)·saving_s − seconds left·mem_ratio

so a pin whose tool has outlived every observed duration is worth nothing and goes first.
Holds no tensors and takes no lock: ProgramPins owns it and serialises access.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ragcache.agents.predictor import ToolDurationPredictor

if TYPE_CHECKING:
    from collections.abc import Callable

    from ragcache.storage.base import TierRoom
    from ragcache.storage.prefix import PathPin

ProgramRef = tuple[str, str]  # (tenant, program id): the same id in two tenants is two programs


@dataclass(frozen=True)
class HeldPin:
    """One program's pin: the store's handle and what the pin was judged worth when made."""

    tenant: str
    program_id: str
    tool: str
    handle: PathPin
    nbytes: int
    ttl_s: float
    pinned_s: float  # on the store's clock, as handle.expires_s
    saving_s: float  # T·η + reload when pinned
    mem_ratio: float  # mem / M when pinned

    @property
    def ref(self) -> ProgramRef:
        return (self.tenant, self.program_id)


class PinBudget:
    def __init__(
        self, room: Callable[[], list[TierRoom]], predictor: ToolDurationPredictor, top_share: float, lower_share: float
    ) -> None:
        """room: the local tiers' bytes and pinned bytes now (PrefixCache.room), fastest first.
        top_share of the fastest tier's bytes and lower_share of each tier below it may be pinned."""
        self.room = room
        self.max_bytes = {tier.name: tier.max_bytes for tier in room()}  # a tier's budget never changes
        self.tiers = list(self.max_bytes)
        self.predictor = predictor
        self.shares = {name: top_share if i == 0 else lower_share for i, name in enumerate(self.tiers)}
        self.held: dict[ProgramRef, HeldPin] = {}
        self.pinned_bytes_max: dict[str, int] = dict.fromkeys(self.tiers, 0)  # high-water mark per tier

    def add(self, pin: HeldPin) -> None:
        """Hold pin (its room made by room_for first); the tier's high-water mark follows."""
        self.held[pin.ref] = pin
        tier = pin.handle.tier
        self.pinned_bytes_max[tier] = max(self.pinned_bytes_max[tier], self.pinned_bytes(tier))

    def budget_bytes(self, tier: str) -> int:
        if tier not in self.max_bytes:
            raise ValueError(f"no local tier named {tier!r}; local tiers: {self.tiers}")
        return int(self.shares[tier] * self.max_bytes[tier])

    def unpinned_bytes(self, tier: str) -> int:
        """The tier's bytes no pin holds (the store's count: pins of every kind)."""
        room = self.tier(tier)
        return room.max_bytes - room.pinned_bytes

    def pinned_bytes(self, tier: str) -> int:
        return sum(pin.nbytes for pin in self.held.values() if pin.handle.tier == tier)

    def value(self, pin: HeldPin, now: float) -> float:
        """What keeping pin from now until it expires is still worth, in seconds."""
        age = now - pin.pinned_s
        probability = self.predictor.hold_probability(pin.tenant, pin.tool, pin.ttl_s, age)
        return probability * pin.saving_s - max(0.0, pin.ttl_s - age) * pin.mem_ratio

    def by_value(self, tier: str, now: float) -> list[HeldPin]:
        """The tier's pins, least valuable per byte first: the order they give way in."""
        pins = [pin for pin in self.held.values() if pin.handle.tier == tier]
        return sorted(pins, key=lambda pin: self.value(pin, now) / max(pin.nbytes, 1))

    def room_for(self, tier: str, nbytes: int, value_s: float, now: float) -> list[HeldPin] | None:
        """The pins to displace so that nbytes more fit the tier's budget ([] when they fit already);
        None when they can never fit, or are worth no more than all they would displace."""
        budget = self.budget_bytes(tier)
        excess = self.pinned_bytes(tier) + nbytes - budget
        if nbytes > budget:
            return None
        if excess <= 0:
            return []
        victims, freed, lost_s = [], 0, 0.0
        for pin in self.by_value(tier, now):
            if freed >= excess:
                break
            victims.append(pin)
            freed += pin.nbytes
            lost_s += max(0.0, self.value(pin, now))
        return victims if freed >= excess and value_s > lost_s else None

    def expired(self, now: float) -> list[HeldPin]:
        """Remove and return the pins whose handles are past their expiry."""
        gone = [pin for pin in self.held.values() if pin.handle.expires_s <= now]
        for pin in gone:
            del self.held[pin.ref]
        return gone

    def tier(self, name: str) -> TierRoom:
        for room in self.room():
            if room.name == name:
                return room
        raise ValueError(f"no local tier named {name!r}; local tiers: {self.tiers}")

    def describe(self, now: float) -> list[dict]:
        """The active pins for stats: program, tool, tier, TTL, age, bytes, value now."""
        return [
            {
                "tenant": pin.tenant,
                "program_id": pin.program_id,
                "tool": pin.tool,
                "tier": pin.handle.tier,
                "ttl_s": pin.ttl_s,
                "age_s": now - pin.pinned_s,
                "expires_in_s": pin.handle.expires_s - now,
                "nbytes": pin.nbytes,
                "value_s": self.value(pin, now),
            }
            for pin in self.held.values()
        ]

    def usage(self) -> dict:
        return {
            name: {
                "budget_bytes": self.budget_bytes(name),
                "pinned_bytes": self.pinned_bytes(name),
                "pinned_bytes_max": self.pinned_bytes_max[name],
                "max_bytes": max_bytes,
            }
            for name, max_bytes in self.max_bytes.items()
        }
