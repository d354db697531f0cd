"""The two tiers' plumbing (tests/conftest.py): what is slow, and how `-n 2` shares the slow tier out."""

import pytest
from conftest import TEAM_STACK_FILES, pytest_collection_modifyitems, worker_scope


def test_the_slow_tier_keeps_a_file_and_the_team_stack_on_one_worker():
    assert {"test_registry.py", "test_security.py", "test_team.py"} <= TEAM_STACK_FILES
    assert "test_e2e.py" not in TEAM_STACK_FILES
    team = {worker_scope(n) for n in ("tests/test_registry.py::test_a[sqlite]", "tests/test_security.py::test_b")}
    assert team == {"the team stack"}  # one worker: one stack for the session
    e2e = {worker_scope(n) for n in ("tests/test_e2e.py::test_a", "tests/test_e2e.py::test_b[x]")}
    assert e2e == {"tests/test_e2e.py"}  # one worker: the smoke pipeline runs once
    assert worker_scope("tests/test_queue.py::test_c") not in e2e | team


def test_every_team_test_is_slow(pytestconfig):
    """A test marked team (or e2e, browser, drill) is in the slow tier whatever else it says: conftest marks it."""

    class Item:
        def __init__(self, *marks):
            self.marks = [getattr(pytest.mark, m) for m in marks]

        def get_closest_marker(self, name):
            return next((m for m in self.marks if m.name == name), None)

        def add_marker(self, mark):
            self.marks.append(mark)

    items = [Item("team"), Item("drill"), Item()]
    pytest_collection_modifyitems(pytestconfig, items)
    assert [bool(i.get_closest_marker("slow")) for i in items] == [True, True, False]
