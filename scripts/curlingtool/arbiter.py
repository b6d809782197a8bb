# SPDX-License-Identifier: GPL-2.0-or-later
"""Who may act when the sender and the receiver lost each other: pure rules.

Never two live copies: every protected VM has one record on the witness,
its *term*, ``"<term>:<holder-id>"`` under ``term_key(vm)``. This module
holds the rules about that record and nothing else: no I/O, no clock, so
that the unit tests drive it directly (scripts/curlingtool/agent.py does
the talking to QEMU and to the witness).

- Before protecting, the sender claims the next term
  (``claim_for_protect``); what it wrote is the *expected* value of this
  protection. The receiver learns it from the witness once protecting
  (``learn_expected`` checks that the sender it was told about holds it).
- When either side loses the other, it tries to swap expected for
  ``claim_after_loss(expected, me)``, the next term held by itself.
  Both sides swap from the same expected value, so at most one swap
  succeeds: ``decide`` turns the witness's answer into the side's action:
  the winner acts (the receiver takes over, the sender continues), the
  loser fences itself, and while the witness does not answer nobody acts.

Limit: a claim for protecting and a sender's win look alike (both are the
next term held by the sender). A receiver therefore learns expected as
soon as it is protecting and trusts only a value read while its QEMU still
says so; one that did not learn it in time fences itself rather than trust
a value that may already be the sender's win. A sender that lost the
receiver and won between the start of protecting and the receiver's read
is the one case the record cannot tell apart.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Literal, Optional, Sequence

from . import CurlingError

Role = Literal["sender", "receiver"]
ROLES: tuple[Role, ...] = ("sender", "receiver")

_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID_RE = re.compile(_ID)
_TERM_RE = re.compile(rf"(?P<number>[1-9][0-9]*):(?P<holder>{_ID})")


class ArbiterError(CurlingError):
    """A term record breaks the rules: the side must not protect or act."""


class MalformedTerm(ArbiterError):
    """The witness holds something that is not ``"<term>:<holder>"``."""


class HeldElsewhere(ArbiterError):
    """Another host holds the term of this VM."""


def term_key(vm: str) -> str:
    """The witness key of the term of the protected VM ``vm``."""
    check_id(vm, "VM name")
    return f"curling/{vm}/term"


def check_id(value: str, what: str = "agent id") -> str:
    """``value`` if it can be a holder or VM name (letters, digits, ``._-``)."""
    if not _ID_RE.fullmatch(value):
        raise ArbiterError(f"{what} {value!r}: use letters, digits, '.', '_' "
                           "and '-' only")
    return value


@dataclasses.dataclass(frozen=True)
class Term:
    """One value of the term record: its number and the side holding it."""

    number: int
    holder: str

    def __str__(self) -> str:
        return f"{self.number}:{self.holder}"

    def next(self, holder: str) -> Term:
        return Term(self.number + 1, holder)


def parse_term(value: str) -> Term:
    m = _TERM_RE.fullmatch(value)
    if m is None:
        raise MalformedTerm(f"term record {value!r} is not '<term>:<holder>'")
    return Term(int(m["number"]), m["holder"])


def claim_for_protect(current: Optional[str], me: str) -> str:
    """The value a sender writes before protecting, given the current one.

    Absent: the first term. Held by ``me``: the next one. Held by anyone
    else: ``HeldElsewhere``, that host protects (or runs) this VM.
    """
    check_id(me)
    if current is None:
        return str(Term(1, me))
    term = parse_term(current)
    if term.holder != me:
        raise HeldElsewhere(f"term {term} is held by {term.holder}: another "
                            f"host holds this VM, {me} must not protect it")
    return str(term.next(me))


def learn_expected(current: Optional[str],
                   holder: str | Sequence[str]) -> str:
    """Check the term a side read while protecting; return it as expected.

    ``holder`` is the side that must have claimed it: the sender peer for
    a receiver, the side itself for a sender; or the sides that may have
    (a receiver of a guest that several hosts may run).
    """
    holders = (holder,) if isinstance(holder, str) else tuple(holder)
    names = " or ".join(holders)
    if current is None:
        raise ArbiterError(f"no term record: {names} did not claim one "
                           "before protecting")
    term = parse_term(current)
    if term.holder not in holders:
        raise HeldElsewhere(f"term {term} is held by {term.holder}, not by "
                            f"{names}: another host holds this VM")
    return str(term)


def claim_after_loss(expected: str, me: str) -> str:
    """The value a side swaps in for ``expected`` after losing its peer."""
    return str(parse_term(expected).next(check_id(me)))


class Action(str, enum.Enum):
    TAKE_OVER = "take-over"   # receiver: run the VM from the last checkpoint
    CONTINUE = "continue"     # sender: release held output, run unprotected
    FENCE = "fence"           # quit this QEMU: the other side acts
    WAIT = "wait"             # no answer from the witness: try again


class Swap(enum.Enum):
    """The witness's answer to one compare-and-swap."""

    DONE = "done"
    REFUSED = "refused"           # the record was not the expected value
    UNREACHABLE = "unreachable"   # no answer: it may or may not have happened


@dataclasses.dataclass(frozen=True)
class PeerLost:
    """What QEMU said when it lost its peer (event CURLING_PEER_LOST)."""

    reason: str
    sequence: Optional[int] = None

    def __str__(self) -> str:
        checkpoint = ("" if self.sequence is None
                      else f", checkpoint {self.sequence}")
        return f"peer lost: {self.reason}{checkpoint}"


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str

    @property
    def final(self) -> bool:
        return self.action is not Action.WAIT

    def line(self, vm: str, role: Role) -> str:
        """The one log line of this decision."""
        return decision_line(vm, role, self.action.value, self.reason)


def decision_line(vm: str, role: str, decision: str, reason: str) -> str:
    """``curling-agent vm=VM role=ROLE decision=DECISION REASON``."""
    return f"curling-agent vm={vm} role={role} decision={decision} {reason}"


def decide(role: Role, me: str, expected: Optional[str], swap: Swap,
           lost: PeerLost, current: Optional[str] = None,
           error: str = "") -> Decision:
    """The action of side ``me`` after it tried to swap ``expected`` for
    ``claim_after_loss(expected, me)``.

    ``current`` is what the witness held after a refused swap (read
    right after it); when that is our claim, an earlier try of ours was
    written but its answer was lost: we won. ``error`` says why the
    witness did not answer. ``expected`` None (never learned): fence,
    unless the witness did not answer (a sender asks it for its term).
    """
    if role not in ROLES:
        raise ArbiterError(f"unknown role {role!r}")
    why = f"({lost})"
    if swap is Swap.UNREACHABLE:
        pending = ("" if expected is None
                   else f", claim {claim_after_loss(expected, me)} pending")
        return Decision(Action.WAIT, f"witness unreachable{pending}: "
                        f"{error or 'no answer'} {why}")
    if expected is None:
        return Decision(Action.FENCE,
                        f"term of this protection unknown {why}")
    claim = claim_after_loss(expected, me)
    act = Action.TAKE_OVER if role == "receiver" else Action.CONTINUE
    if swap is Swap.DONE:
        return Decision(act, f"term {claim} won {why}")
    if current == claim:
        return Decision(act, f"term {claim} won by an earlier try whose "
                        f"answer was lost {why}")
    holds = "nothing" if current is None else current
    return Decision(Action.FENCE, f"term {claim} lost: the witness holds "
                    f"{holds}, not {expected} {why}")
