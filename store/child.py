"""Work apart from the server, in a child process at the lowest CPU priority: an import's
reading (memory/import_child.py), a bundle's check (serve/bundle.py), a training job
(finetune/job_child.py). Long pure-Python or torch work in the server's own process would hold
the interpreter lock that every reply's tokens pass through.

Both halves of how they talk: the child says one JSON object per line on its stdout (`say`,
after `apart()`), the parent reads them (`run_child`, or `message` for a parent that reads the
lines itself, as the asynchronous training runner does). The last line is the answer: it holds
"result", or "failed" with why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

LOWEST = 19
_channel = sys.stdout


def lowest_priority() -> None:
    """The server's threads and the engine come first."""
    try:
        os.nice(LOWEST)
    except OSError:
        pass


def apart() -> None:
    """In the child, first: the lowest priority, and messages on a copy of stdout while stdout
    itself goes to stderr, so that what libraries print is never taken for a message."""
    global _channel
    lowest_priority()
    _channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def say(message: dict) -> None:
    print(json.dumps(message), file=_channel, flush=True)


def message(line: str | bytes) -> dict | None:
    """A line a child said, or None when it is not one of its messages."""
    try:
        found = json.loads(line)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def run_child(module: str, job: dict, label: str,
              progress: Callable[[int, int], None] | None = None) -> dict:
    """Run `python -m MODULE JOB` (JOB as JSON) and read what it says; returns its answer, the
    last message, which holds "result" or "failed". {"progress": [done, total]} goes to progress."""
    child = subprocess.Popen([sys.executable, "-m", module, json.dumps(job)],
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    answer: dict = {}
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if (said := message(line)) is None:
                continue
            answer = said
            if "progress" in answer and progress:
                progress(*answer["progress"])
    finally:
        if child.poll() is None and "result" not in answer and "failed" not in answer:
            child.kill()   # this thread was stopped: the child's work is no one's now
        code = child.wait()
    if "result" not in answer and "failed" not in answer:
        raise RuntimeError(f"the process working on {label} ended without an answer (exit code {code}); "
                           "its traceback is in the server's log")
    return answer
