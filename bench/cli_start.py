"""How long a `homefire` command takes to start: the commands that need no model, no index and
no server (`--help`, `user list`; `companion list` runs the application in its own process,
without engine, index or model: serve/in_process.py) against the same interpreter importing what
the CLI used to import at start (Chroma and torch, by way of serve.bundle -> memory.store).

Each figure is the median wall time of --runs fresh processes on an empty data directory.

    .venv/bin/python bench/cli_start.py [--runs 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def median_s(command: list[str], runs: int) -> float:
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per figure (default 7)")
    args = parser.parse_args()
    data = tempfile.mkdtemp(prefix="cli-start-")
    cli = [sys.executable, "-m", "serve.cli"]
    baseline = median_s([sys.executable, "-c", "import memory.store, serve.cli"], args.runs)
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {args.runs} runs each")
    print(f"baseline: importing serve.cli with Chroma and torch (as before): {baseline:.2f} s")
    for name, command in (("homefire --help", ["--help"]), ("homefire user list", ["user", "list"]),
                          ("homefire companion list", ["companion", "list"])):
        took = median_s([*cli, *command, *(["--data-dir", data] if command != ["--help"] else [])], args.runs)
        print(f"{name:<30} {took:.2f} s   ratio to the baseline {took / baseline:.2f}")


if __name__ == "__main__":
    main()
