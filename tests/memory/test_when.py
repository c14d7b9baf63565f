"""The time a question asks about."""

from datetime import datetime

import pytest

from memory.when import asked_span

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
