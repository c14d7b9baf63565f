"""The time a question asks about."""

from datetime import datetime

import pytest

from memory.when import asked_span, relative_to

WEDNESDAY = datetime(2025, 6, 4, 15, 30)


@pytest.mark.parametrize(("question", "start", "end"), [
    ("What did I achieve in May?", "2025-05-01", "2025-06-01"),
    ("what happened in December", "2024-12-01", "2025-01-01"),   # the latest December
    ("Where was I in May 2024?", "2024-05-01", "2024-06-01"),
    ("What did I do on March 3?", "2025-03-03", "2025-03-04"),
    ("What did I do last week?", "2025-05-26", "2025-06-02"),
    ("anything new this week?", "2025-06-02", "2025-06-09"),
    ("What did I say yesterday?", "2025-06-03", "2025-06-04"),
    ("What happened three weeks ago?", "2025-05-09", "2025-05-20"),
    ("What did I do 2 days ago?", "2025-06-01", "2025-06-04"),
    ("How was last weekend?", "2025-05-31", "2025-06-02"),
    ("What did I do last month?", "2025-05-01", "2025-06-01"),
    ("Where did we go last summer?", "2024-06-01", "2024-09-01"),
    ("What did I read in 2024?", "2024-01-01", "2025-01-01"),
])
def test_the_span_a_question_asks_about(question, start, end):
    span = asked_span(question, WEDNESDAY)
    assert span is not None, question
    assert [f"{d:%Y-%m-%d}" for d in span] == [start, end]


@pytest.mark.parametrize("question", ["May I ask what my dog is called?", "When did I adopt a kitten?",
                                      "Which city do I live in these days?", "I march on", "What's new?"])
def test_questions_that_name_no_time(question):
    assert asked_span(question, WEDNESDAY) is None


@pytest.mark.parametrize(("question", "event", "window"), [
    ("What was I up to the week before I went to Lisbon?", "went to Lisbon", (-10, 0)),
    ("What happened in the days after the move?", "the move", (0, 4)),
    ("How did I feel the day before my exam?", "my exam", (-2, 0)),
    ("What did we do the weekend after we got married", "got married", (0, 8)),
])
def test_a_time_relative_to_an_event_the_question_names(question, event, window):
    relative = relative_to(question)
    assert relative is not None and relative.event == event
    assert (relative.start_days, relative.end_days) == window
    # Dated by the event: the window holds the days around it, never the event's own day.
    said = WEDNESDAY.timestamp()
    start, end = relative.span(said)
    assert start < said - 86400 < end if window[1] == 0 else start < said + 86400 < end
    assert not start <= said < end


@pytest.mark.parametrize("question", ["What did I do last week?", "Before we start, how are you?",
                                      "What happened after that?"])
def test_questions_relative_to_no_event(question):
    assert relative_to(question) is None
