"""The Docker image: the files its COPY lines and .dockerignore give it are a working package.

No Docker daemon runs here, so the build context is reproduced from the two files and every
module of the package is imported from a copy of exactly that context.
"""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for our patterns: a match on the path or any folder above it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], bare)):
                return True
    return False


def image_files(tmp_path: Path) -> Path:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    context = [f for f in tracked if not ignored(f, patterns) and (REPO / f).is_file()]
    app = tmp_path / "app"
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        assert not any(w.startswith("--from") for w in words), line
        *sources, target = words[1:]
        for source in sources:
            chosen = context if source == "." else [f for f in context if f == source or
                                                    f.startswith(source.rstrip("/") + "/")]
            assert chosen, f"COPY {source}: nothing in the build context"
            for f in chosen:   # WORKDIR /app: targets are relative to it, and keep the source's path
                dest = app / f if target in (".", "./") or target == source else app / target / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, dest)
    return app


def test_the_image_holds_every_module_and_a_healthcheck(tmp_path):
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    app = image_files(tmp_path)
    assert not (app / "tests").exists() and not (app / ".venv").exists()
    packages = ("serve", "finetune", "memory", "store")
    modules = sorted(str(p.relative_to(app).with_suffix("")).replace("/", ".")
                     for package in packages for p in (app / package).rglob("*.py"))
    assert {"serve.cli", "finetune.lora", "memory.store", "store.db"} <= set(modules)
    check = ("import importlib, sys\n"
             f"for name in {modules!r}:\n"
             "    module = importlib.import_module(name.removesuffix('.__init__'))\n"
             f"    assert module.__file__.startswith({str(app)!r}), (name, module.__file__)\n"
             "print('imported', len(sys.argv) and 'all')\n")
    done = subprocess.run([sys.executable, "-c", check], cwd=app, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (app / "configs" / "homefire.yaml").exists() and (app / "pyproject.toml").exists()
