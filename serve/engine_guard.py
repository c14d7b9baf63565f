"""Runs a command (the vLLM server) and takes its whole process group down with Homefire.

vLLM's engine-core and worker processes outlive their server when it is killed, so the
kernel's parent-death signal on the server alone is not enough. This guard leads the
process group, receives SIGTERM when Homefire dies (even by SIGKILL), and then ends every
process in its group: SIGTERM first, SIGKILL after a grace period.

Usage: python -m serve.engine_guard PARENT_PID COMMAND [ARGS...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 10


def end_group(code: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal also reaches us
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and _others_alive():
        time.sleep(0.2)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _others_alive():
        os.killpg(0, signal.SIGKILL)  # ends us too
    sys.exit(code)


def _others_alive() -> bool:
    group, me = os.getpgrp(), os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


def main() -> None:
    parent, command = int(sys.argv[1]), sys.argv[2:]
    signal.signal(signal.SIGTERM, lambda *_: end_group(0))
    if os.getppid() != parent:  # Homefire died before the parent-death signal was armed
        end_group(1)
    child = subprocess.Popen(command)
    code = child.wait()
    end_group(code if code >= 0 else 128 - code)  # what the server left behind goes too


if __name__ == "__main__":
    main()
