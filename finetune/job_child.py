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
    {"evaluating": true}        training is over; the voice report is being made
    {"result": {...}}           the manifest's metrics and the voice report's figures
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
    from finetune.evaluate import voice_match
    from finetune.lora import finetune

    data_dir, db = Path(job["data_dir"]), Database(Path(job["db"]))
    room = Room()
    try:
        companion = CompanionStore(db).get(job["companion"])
        if companion is None:
            raise FinetuneError(f"companion {job['companion']!r} no longer exists")
        config = FinetuneConfig.model_validate(job["config"])
        version = job.get("version")
        folder = version and adapters.version_dir(data_dir, companion.key, version)
        if job["kind"] == "train" and not (folder and (folder / "manifest.json").exists()):
            resume = None   # (a version with a manifest was trained: it was cut short in its report)
            if folder and (folder / "checkpoint" / "trainer_state.pt").exists():
                resume = version
            elif folder:   # killed before its first checkpoint: nothing to keep
                shutil.rmtree(folder, ignore_errors=True)
            def begun(folder: Path) -> None:
                say({"version": folder.name})
                room.ask()

            out = finetune(data_dir, db, companion, job["model_path"], job["model_id"], config, resume,
                           lambda point: say({"progress": point}), job["user"], job["until"],
                           begun=begun, step_limit=job.get("step_limit"))
            version = out.name
        metrics = adapters.manifest(data_dir, companion.key, version).get("metrics", {})
        say({"evaluating": True})
        try:
            voice = voice_match(data_dir, db, companion, job["model_path"], version, job["samples"],
                                job["max_new_tokens"], job["user"], job["until"], job.get("in_use"),
                                loading=room.ask)
            voice = {k: voice[k] for k in ("loss", "perplexity", "similarity_to_real", "held_out_tokens",
                                           "in_use")}
        except FinetuneError as err:   # no held-out conversations: a version without a report
            voice = {"error": str(err)}
        return {"version": version, "metrics": metrics, "voice": voice}
    finally:
        db.close()


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
