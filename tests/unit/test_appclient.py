# SPDX-License-Identifier: GPL-2.0-or-later
"""appclient.check_table: what the database must hold after failovers."""

from curlingtool.appclient import TxState, check_table


def state(client: int, acked: int, in_doubt=None) -> dict:
    st = TxState(client, acked=acked, in_doubt=in_doubt).status()
    return st


def test_exact_database_is_clean() -> None:
    assert check_table([state(0, 5), state(1, 3)],
                       {0: (5, 1, 5), 1: (3, 1, 3)}, {0: 5, 1: 3}) == []


def test_transaction_in_doubt_may_be_committed_or_not() -> None:
    states = [state(0, 5, in_doubt=6)]
    assert check_table(states, {0: (6, 1, 6)}, {0: 6}) == []
    assert check_table(states, {0: (5, 1, 5)}, {0: 5}) == []


def test_lost_acknowledged_transaction() -> None:
    problems = check_table([state(0, 7)], {0: (5, 1, 5)}, {0: 5})
    assert problems == ["client 0: acknowledged 7 transactions, the "
                        "database has up to 5"]


def test_phantom_transaction() -> None:
    problems = check_table([state(0, 5)], {0: (7, 1, 7)}, {0: 7})
    assert len(problems) == 1 and "never attempted" in problems[0]


def test_hole_and_counter_mismatch() -> None:
    problems = check_table([state(0, 5)], {0: (4, 1, 5)}, {0: 5})
    assert any("missing" in p for p in problems)
    assert any("counter 5, rows 4" in p for p in problems)


def test_client_without_rows() -> None:
    assert check_table([state(3, 0)], {}, {}) == []
    assert check_table([state(3, 2)], {}, {}) != []


def test_ack_tracks_gap_and_clears_doubt() -> None:
    st = TxState(0, in_doubt=1)
    st.ack(1, 10.0, 0.01)
    st.ack(2, 12.5, 0.02)
    assert st.acked == 2 and st.in_doubt is None
    assert st.max_gap == 2.5
