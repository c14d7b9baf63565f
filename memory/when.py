"""The time a question asks about ("last week", "in May", "three days ago"), as a span of dates;
or relative to an event it names ("the week before I went to Lisbon"), which recall dates by
finding the event among the memories.

Recall favours memories from that span. Only phrases that name time unambiguously count:
"may" is a month only after "in", "during", "since", "of", "early", "late" or before a
day or year, so "May I ask" asks about no time. dateparser's search_dates (1.2, tried
here) read "May I ask ..." as 1 May and answers "last week" with one day, not a span.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "a couple of": 2, "couple of": 2, "three": 3, "four": 4,
           "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "a few": 3, "few": 3}
UNITS = {"day": 1, "week": 7, "month": 30, "year": 365}

_MONTH = "|".join(MONTHS)
_NUMBER = r"\d+|" + "|".join(sorted((re.escape(n) for n in NUMBERS), key=len, reverse=True))
_AGO = re.compile(rf"\b({_NUMBER})\s+(day|week|month|year)s?\s+ago\b")
_LAST = re.compile(r"\b(last|this|past)\s+(night|weekend|week|month|year|summer|winter|spring|autumn)\b")
_IN_MONTH = re.compile(rf"\b(?:in|during|since|of|early|late|mid|last)\s+({_MONTH})(?:\s+(\d{{4}}))?\b")
_MONTH_DAY = re.compile(rf"\b({_MONTH})\s+(\d{{1,2}}|\d{{4}})\b")
_YEAR = re.compile(r"\b(?:in|during|since|of)\s+((?:19|20)\d\d)\b")
_DAY = re.compile(r"\b(yesterday|today|tonight|this morning|recently|lately)\b")
SEASONS = {"spring": 3, "summer": 6, "autumn": 9, "winter": 12}


def asked_span(question: str, now: datetime) -> tuple[datetime, datetime] | None:
    """The span [start, end) the question is about, or None when it names no time."""
    text = question.lower()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if match := _AGO.search(text):
        count = int(match[1]) if match[1].isdigit() else NUMBERS[match[1]]
        days = count * UNITS[match[2]]
        middle = today - timedelta(days=days)
        margin = timedelta(days=max(1, days // 4))   # "three weeks ago" is rarely to the day
        return middle - margin, middle + margin + timedelta(days=1)
    if match := _DAY.search(text):
        word = match[1]
        if word == "yesterday":
            return today - timedelta(days=1), today
        if word in ("recently", "lately"):
            return today - timedelta(days=30), today + timedelta(days=1)
        return today, today + timedelta(days=1)
    if match := _LAST.search(text):
        last, unit = match[1] == "last", match[2]
        if unit == "night":
            start = today - timedelta(days=1) if last else today
            return start, start + timedelta(days=1)
        if unit == "weekend":
            start = today - timedelta(days=(today.weekday() - 5) % 7)   # the latest Saturday, maybe today
            if last and today.weekday() >= 5:
                start -= timedelta(days=7)
            return start, start + timedelta(days=2)
        if unit == "week":
            start = today - timedelta(days=today.weekday() + (7 if last else 0))
            return start, start + timedelta(days=7)
        if unit == "month":
            start = _add_months(today.replace(day=1), -1 if last else 0)
            return start, _add_months(start, 1)
        if unit == "year":
            start = today.replace(month=1, day=1)
            return (start.replace(year=start.year - 1), start) if last else (start, today + timedelta(days=1))
        start = datetime(today.year, SEASONS[unit], 1, tzinfo=today.tzinfo)
        if start > today or last and _add_months(start, 3) > today:
            start = start.replace(year=start.year - 1)
        return start, _add_months(start, 3)
    if match := _IN_MONTH.search(text) or _MONTH_DAY.search(text):
        month = MONTHS.index(match[1]) + 1
        year = int(match[2]) if match[2] and len(match[2]) == 4 else None
        if year is None:   # the latest such month that has begun
            year = today.year if month <= today.month else today.year - 1
        start = datetime(year, month, 1, tzinfo=today.tzinfo)
        if match[2] and len(match[2]) <= 2 and 1 <= int(match[2]) <= 31:   # "March 3": that day
            day = start + timedelta(days=int(match[2]) - 1)
            return day, day + timedelta(days=1)
        return start, _add_months(start, 1)
    if match := _YEAR.search(text):
        start = datetime(int(match[1]), 1, 1, tzinfo=today.tzinfo)
        return start, start.replace(year=start.year + 1)
    return None


# "the week before I went to Lisbon", "in the days after the move", "the month before my exam"
_RELATIVE = re.compile(r"\b(?:the\s+|a\s+|in\s+the\s+)?(day|days|week|weeks|weekend|month)\s+"
                       r"(before|after|leading up to)\s+(.{3,}?)\s*[?.!]*$", re.IGNORECASE)
WINDOWS = {"day": 2, "days": 4, "week": 10, "weeks": 21, "weekend": 8, "month": 35}


@dataclass(frozen=True)
class Relative:
    """A time relative to an event: the event's words, and the window around its date, in days
    (start, end: negative before it)."""

    event: str
    start_days: float
    end_days: float

    def span(self, at: float) -> tuple[float, float]:
        """The window as timestamps, around the event said at `at`; the event's own day is
        not in it."""
        if self.end_days <= 0:
            return at + self.start_days * 86400, at - 12 * 3600
        return at + 12 * 3600, at + self.end_days * 86400


def relative_to(question: str) -> Relative | None:
    """The event a question dates its time by, and the window ("the week before": the ten days
    before it), or None. Asked only when the question names no time of its own (asked_span)."""
    match = _RELATIVE.search(question.strip())
    if match is None:
        return None
    days = WINDOWS[match[1].lower()]
    event = re.sub(r"^(?:i|we)\s+", "", match[3], flags=re.IGNORECASE).strip()
    if match[2].lower() == "after":
        return Relative(event, 0, days)
    return Relative(event, -days, 0)


def _add_months(day: datetime, months: int) -> datetime:
    index = day.year * 12 + day.month - 1 + months
    return day.replace(year=index // 12, month=index % 12 + 1, day=1)
