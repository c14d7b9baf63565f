"""One fine-tuning job of the server, in a child process at the lowest CPU priority.

Training and the voice report after it are minutes to hours of torch. In the server's own
process they would hold the interpreter lock that every reply's tokens pass through, and a
crash would take the server with them. Here they run apart, on the cores the server gives
(on the CPU build: not the engine's). The child speaks as every child does (store/child.py),
one JSON object per line:

    {"version": "v3"}           the folder it writes, once its dataset is built
    {"ready": true}             it has shown it can run (settings, history, dataset): it waits
                                for a line on stdin, sent once the server has made room on the
                                GPU, before it loads the model (so a job that fails early never
                                stops the engine)
    {"progress": {...}}         after each step: step, total_steps, loss, eval_loss, tokens_per_s
    {"evaluating": true}        training is over; the voice report (or a migration's comparison)
                                is being made
    {"result": {...}}           the manifest's metrics and the voice report's figures; a drift's
                                or a migration's comparison of two setups
    {"failed": "why"}           a setting or the history is wrong (FinetuneError)

Run as `python -m finetune.job_child JOB` (JOB: JSON, made by serve/finetunes.py). A job
that resumes a version without a checkpoint starts that version again from nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

from finetune.config import FinetuneConfig, FinetuneError
from store import adapters
from store.adapters import AdapterError
from store.child import apart, say
from store.companions import CompanionStore
from store.db import Database
from store.files import write_whole


class Room:
    """The GPU, asked for once, when the job is about to load a model."""

    def __init__(self) -> None:
        self.given = False

    def ask(self) -> None:
        if not self.given:
            say({"ready": True})
            sys.stdin.readline()   # the server answers once the engine has made room
            self.given = True


def run(job: dict) -> dict:
    data_dir, db = Path(job["data_dir"]), Database(Path(job["db"]))
    room = Room()
    try:
        companion = CompanionStore(db).get(job["companion"])
        if companion is None:
            raise FinetuneError(f"companion {job['companion']!r} no longer exists")
        config = FinetuneConfig.model_validate(job["config"])
        if job["kind"] == "drift":
            return {"comparison": drifted(job, data_dir, db, companion, config, room)}
        if job["kind"] == "migrate":
            return migrated(job, data_dir, db, companion, config, room)
        version = job.get("version")
        if job["kind"] == "train":
            version = trained(job, data_dir, db, companion, config, room, job["model_path"], job["model_id"])
        return {"version": version, "metrics": adapters.manifest(data_dir, companion.key, version).get(
            "metrics", {}), "voice": reported(job, data_dir, db, companion, version, room)}
    finally:
        db.close()


def trained(job: dict, data_dir: Path, db: Database, companion, config: FinetuneConfig, room: Room,
            model_path: str, model_id: str) -> str:
    """The version the job trains on model_path (a resumed job: from its checkpoint). A version
    with a manifest was trained already: the job was cut short in its report."""
    from finetune.lora import finetune

    version = job.get("version")
    folder = version and adapters.version_dir(data_dir, companion.key, version)
    if folder and (folder / "manifest.json").exists():
        return version
    resume = None
    if folder and (folder / "checkpoint" / "trainer_state.pt").exists():
        resume = version
    elif folder:   # killed before its first checkpoint: nothing to keep
        shutil.rmtree(folder, ignore_errors=True)

    def begun(folder: Path) -> None:
        say({"version": folder.name})
        room.ask()

    out = finetune(data_dir, db, companion, model_path, model_id, config, resume,
                   lambda point: say({"progress": point}), job["user"], job["until"],
                   begun=begun, step_limit=job.get("step_limit"))
    return out.name


def reported(job: dict, data_dir: Path, db: Database, companion, version: str, room: Room) -> dict:
    """The voice report's figures (`homefire eval`), or why there is none."""
    from finetune.evaluate import voice_match

    say({"evaluating": True})
    try:
        voice = voice_match(data_dir, db, companion, job["model_path"], version, job["samples"],
                            job["max_new_tokens"], job["user"], job["until"], job.get("in_use"),
                            loading=room.ask)
    except FinetuneError as err:   # no held-out conversations: a version without a report
        return {"error": str(err)}
    summary = {k: voice[k] for k in ("loss", "perplexity", "similarity_to_real", "held_out_tokens", "in_use")}
    found = voice["discriminator"]
    return summary | {"told_apart": found["told_apart"], "calibration": found["calibration"]}


def drifted(job: dict, data_dir: Path, db: Database, companion, config: FinetuneConfig, room: Room) -> dict:
    """The current setup (the server's model, the version in use) beside another: a version of
    the companion's, the base model, or another base model with its newest version that fits."""
    from finetune.drift import Setup, compare, fitting_version, probes

    target, here = job["target"], job["model_path"]
    asked = probes(db, companion, config, job["user"], target["probes"])   # before any model loads
    if target.get("model"):
        other = Setup(target["model"], fitting_version(data_dir, companion, target["model"]))
    else:
        other = Setup(here, None if target["against"] == "base" else target["against"])
    room.ask()
    return compare(data_dir, db, companion, Setup(here, job.get("in_use")), other, config, asked, job["user"],
                   target["max_new_tokens"])


def migrated(job: dict, data_dir: Path, db: Database, companion, config: FinetuneConfig, room: Room) -> dict:
    """The voice tuned again on another base model, and both setups on the same probes; nothing
    is switched (the new version waits until the server runs that model). The comparison is kept
    in the version's folder too (migrate.json)."""
    from finetune.drift import Setup, probes, voice

    target = job["target"]
    asked = probes(db, companion, config, job["user"], target["samples"])   # before hours of training
    version = trained(job, data_dir, db, companion, config, room, target["model"], target["model"])
    say({"evaluating": True})
    room.ask()
    old, new = Setup(job["model_path"], job.get("in_use")), Setup(target["model"], version)
    sides = {name: voice(data_dir, db, companion, setup, asked, config, job["user"], target["max_new_tokens"])
             for name, setup in (("old", old), ("new", new))}
    result = {"companion": companion.id, "version": version, "old": sides["old"], "new": sides["new"],
              "probes": [{"prompt": m[-1]["content"], "real": real, "old": sides["old"]["replies"][i],
                          "new": sides["new"]["replies"][i]} for i, (m, real) in enumerate(asked)],
              "switched": False}
    write_whole(adapters.version_dir(data_dir, companion.key, version) / "migrate.json",
                json.dumps(result, ensure_ascii=False, indent=2))
    metrics = adapters.manifest(data_dir, companion.key, version).get("metrics", {})
    return {"version": version, "metrics": metrics, "comparison": result}


def main(job: dict) -> None:
    apart()
    if cores := job.get("cores"):
        os.sched_setaffinity(0, cores)
        import torch

        torch.set_num_threads(len(cores))
    try:
        say({"result": run(job)})
    except (FinetuneError, AdapterError) as err:
        say({"failed": str(err)})
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
