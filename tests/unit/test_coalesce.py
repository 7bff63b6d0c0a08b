"""The worker merges token events that piled up for a slow consumer into fewer messages, keeping their order."""

from worker.engine import FinishEvent, TokenEvent
from worker.sequence import FinishReason
from worker.service import coalesce


def test_runs_of_token_events_merge_and_finish_stays_last():
    fin = FinishEvent(FinishReason.LENGTH, 3, 3, 0, [1, 2, 3], [4, 5, 6])
    events = [TokenEvent("a", [4]), TokenEvent("b", [5]), TokenEvent("", [6]), fin]
    out = coalesce(events)
    assert out == [TokenEvent("ab", [4, 5, 6]), fin]
    assert events[0] == TokenEvent("a", [4])  # inputs are not modified


def test_single_and_empty_lists_pass_through():
    one = [TokenEvent("x", [1])]
    assert coalesce(one) is one and coalesce([]) == []
