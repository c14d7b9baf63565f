"""For the serving benchmarks: a real `homefire serve` on a data directory, once it is ready."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from serve.default_model import ensure_default_model
from store.users import local_key

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def homefire_server(data_dir: Path, config_yaml: str) -> Iterator[tuple[str, str]]:
    """Run `homefire serve` with these settings; yields (url, the owner's key) when it is ready."""
    ensure_default_model(data_dir / "models")
    config = data_dir / "bench-config.yaml"
    config.write_text(config_yaml)
    key = local_key(data_dir)   # the owner's key, as `homefire user key` prints it
    print(f"starting homefire serve in {data_dir} ...", flush=True)
    log = (data_dir / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--data-dir", str(data_dir),
                             "--port", "0", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        info = data_dir / "run" / "server.json"
        while True:
            if proc.poll() is not None:
                sys.exit(f"homefire serve exited; see {data_dir / 'serve.log'}")
            if info.exists():
                url = json.loads(info.read_text())["url"]
                try:
                    if httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {key}"},
                                 timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
