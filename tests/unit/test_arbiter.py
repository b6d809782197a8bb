# SPDX-License-Identifier: GPL-2.0-or-later
"""The arbitration rules: term claims, decisions, one winner only."""

from __future__ import annotations

import itertools
from typing import Optional

import pytest

from curlingtool import arbiter
from curlingtool.arbiter import (Action, Decision, HeldElsewhere,
                                 MalformedTerm, PeerLost, Role, Swap)
from curlingtool.witness import MemoryWitness

LOST = PeerLost("nothing received for 1000 ms", 412)
KEY = arbiter.term_key("demo")


def test_term_key_and_values() -> None:
    assert KEY == "curling/demo/term"
    assert arbiter.parse_term("12:host-b.example") == arbiter.Term(12, "host-b.example")
    assert str(arbiter.Term(3, "A").next("B")) == "4:B"


@pytest.mark.parametrize("value", ["", "3", ":A", "0:A", "-1:A", "x:A",
                                   "3:", "3:A B", "03:A", "3:A:B"])
def test_malformed_values_are_refused(value: str) -> None:
    with pytest.raises(MalformedTerm):
        arbiter.parse_term(value)


@pytest.mark.parametrize("bad", ["", "a b", "a:b", "-x", "a/b"])
def test_ids_and_names_are_checked(bad: str) -> None:
    with pytest.raises(arbiter.ArbiterError):
        arbiter.check_id(bad)
    with pytest.raises(arbiter.ArbiterError):
        arbiter.term_key(bad)


def test_claim_absent_own_and_foreign() -> None:
    assert arbiter.claim_for_protect(None, "A") == "1:A"
    assert arbiter.claim_for_protect("1:A", "A") == "2:A"
    assert arbiter.claim_for_protect("41:A", "A") == "42:A"
    with pytest.raises(HeldElsewhere, match="held by B: another host holds "
                       "this VM, A must not protect it"):
        arbiter.claim_for_protect("7:B", "A")
    with pytest.raises(MalformedTerm):
        arbiter.claim_for_protect("garbage", "A")


def test_learn_expected_checks_the_holder() -> None:
    assert arbiter.learn_expected("3:A", "A") == "3:A"
    with pytest.raises(HeldElsewhere, match="held by C, not by A"):
        arbiter.learn_expected("3:C", "A")
    with pytest.raises(arbiter.ArbiterError, match="no term record"):
        arbiter.learn_expected(None, "A")


def test_claim_after_loss_is_the_next_term() -> None:
    assert arbiter.claim_after_loss("2:A", "B") == "3:B"
    assert arbiter.claim_after_loss("2:A", "A") == "3:A"


@pytest.mark.parametrize("role,act", [("receiver", Action.TAKE_OVER),
                                      ("sender", Action.CONTINUE)])
def test_winner_acts(role: Role, act: Action) -> None:
    d = arbiter.decide(role, "B", "2:A", Swap.DONE, LOST)
    assert d == Decision(act, "term 3:B won (peer lost: nothing received for "
                              "1000 ms, checkpoint 412)")
    assert d.final


def test_the_decision_is_one_line() -> None:
    d = arbiter.decide("receiver", "B", "2:A", Swap.DONE, LOST)
    assert d.line("demo", "receiver") == (
        "curling-agent vm=demo role=receiver decision=take-over term 3:B won "
        "(peer lost: nothing received for 1000 ms, checkpoint 412)")


@pytest.mark.parametrize("role", ["receiver", "sender"])
def test_loser_fences(role: Role) -> None:
    d = arbiter.decide(role, "B", "2:A", Swap.REFUSED, LOST, current="3:A")
    assert d.action is Action.FENCE
    assert d.reason.startswith("term 3:B lost: the witness holds 3:A, not 2:A")


@pytest.mark.parametrize("role", ["receiver", "sender"])
def test_unreachable_witness_means_no_action(role: Role) -> None:
    d = arbiter.decide(role, "B", "2:A", Swap.UNREACHABLE, LOST,
                       error="connection refused")
    assert d.action is Action.WAIT and not d.final
    assert "witness unreachable, claim 3:B pending: connection refused" in d.reason


def test_a_lost_answer_of_our_own_write_still_wins() -> None:
    d = arbiter.decide("receiver", "B", "2:A", Swap.REFUSED, LOST,
                       current="3:B")
    assert d.action is Action.TAKE_OVER
    assert "earlier try" in d.reason


def test_unknown_term_fences() -> None:
    d = arbiter.decide("receiver", "B", None, Swap.REFUSED, LOST)
    assert d.action is Action.FENCE
    assert d.reason.startswith("term of this protection unknown")


def test_unknown_term_and_no_witness_waits() -> None:
    d = arbiter.decide("sender", "A", None, Swap.UNREACHABLE, LOST,
                       error="timed out")
    assert d.action is Action.WAIT
    assert d.reason.startswith("witness unreachable: timed out (peer lost:")


def test_peer_lost_without_sequence() -> None:
    assert str(PeerLost("connection reset")) == "peer lost: connection reset"


def _side(witness: MemoryWitness, role: Role, me: str, expected: str,
          answer_lost: bool = False) -> Decision:
    """One side's arbitration as the agent does it, against ``witness``.

    ``answer_lost``: the first swap is written but its answer never comes
    back, so the side tries again.
    """
    claim = arbiter.claim_after_loss(expected, me)
    if answer_lost:
        witness.compare_and_swap(KEY, expected, claim)
        d = arbiter.decide(role, me, expected, Swap.UNREACHABLE, LOST)
        assert d.action is Action.WAIT
    current: Optional[str] = None
    if witness.compare_and_swap(KEY, expected, claim):
        swap = Swap.DONE
    else:
        swap, current = Swap.REFUSED, witness.read(KEY)
    return arbiter.decide(role, me, expected, swap, LOST, current)


@pytest.mark.parametrize("first", ["sender", "receiver"])
@pytest.mark.parametrize("lost_answer", [None, "sender", "receiver"])
def test_exactly_one_side_wins(first: Role, lost_answer: Optional[str]) -> None:
    witness = MemoryWitness()
    expected = arbiter.claim_for_protect(None, "A")
    assert witness.compare_and_swap(KEY, None, expected)
    sides: dict[Role, str] = {"sender": "A", "receiver": "B"}
    order = [first, "receiver" if first == "sender" else "sender"]
    decisions = {role: _side(witness, role, sides[role], expected,
                             answer_lost=(lost_answer == role))
                 for role in order}
    actions = sorted(d.action.value for d in decisions.values())
    assert actions in (["continue", "fence"], ["fence", "take-over"])
    winner = next(r for r, d in decisions.items() if d.action is not Action.FENCE)
    assert winner == first
    assert witness.read(KEY) == f"2:{sides[first]}"


def test_a_stale_side_can_never_win() -> None:
    """A side arbitrating with an old term loses to every later one."""
    witness = MemoryWitness({KEY: "5:B"})
    for role, me in itertools.product(("sender", "receiver"), ("A", "B", "C")):
        d = _side(witness, role, me, "3:A")  # type: ignore[arg-type]
        assert d.action is Action.FENCE
    assert witness.read(KEY) == "5:B"
