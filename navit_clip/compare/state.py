"""OUT/state.json: the settings a comparison was started with and the result of each finished job,
written after every job (atomically), so that an interrupted comparison resumes where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

from navit_clip.compare.schedule import Job
from navit_clip.errors import InputError

STATE_FILE = "state.json"
FIXED = ("shards", "eval_shards", "steps", "checkpoints", "overrides", "flops")  # what a rerun in the same OUT must keep
UNRECORDED = {"overrides": {}, "flops": None}  # what a setting was in a comparison recorded before it existed


class CompareState:
    def __init__(self, out: str | Path, settings: dict) -> None:
        self.path = Path(out) / STATE_FILE
        self.settings = settings
        self.done: dict[str, dict] = {}
        self.run_steps: dict[str, int] = {}  # each recipe's steps, once chosen (a --flops budget's share)
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            before = saved["settings"]
            changed = [k for k in FIXED if before.get(k, UNRECORDED.get(k)) != settings.get(k, UNRECORDED.get(k))]
            if changed:
                was = ", ".join(f"{k}={before.get(k)!r}" for k in changed)
                raise InputError(f"{self.path.parent} holds a comparison made with {was}; "
                                 "use another --out or the same settings")
            self.done = saved["done"]
            self.run_steps = saved.get("run_steps", {})

    def finished(self, job: Job) -> bool:
        return job.id in self.done

    def record(self, job: Job, result: dict) -> None:
        self.done[job.id] = result
        self._write()

    def keep_steps(self, steps: dict[str, int]) -> None:
        """Record the steps of recipes new to this comparison. Each recipe keeps the steps first
        chosen: a rerun trains and reads its runs at those even where a recount of the FLOPs per step
        (after a change to the code or the data) would now round otherwise."""
        if steps:
            self.run_steps = {**steps, **self.run_steps}
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "done": self.done, "run_steps": self.run_steps},
                                  indent=1) + "\n")
        os.replace(tmp, self.path)

    def evaluations(self) -> list[dict]:
        return [r for r in self.done.values() if r.get("kind") == "eval"]

    def trainings(self) -> list[dict]:
        return [r for r in self.done.values() if r.get("kind") == "train"]
