"""The run directory: one type that knows where a run keeps everything.

```
runs/NAME/
  config.yaml            resolved config (reproduces the run)
  data_manifest.json     source file + sha256, rows read, rows dropped by reason, rows per split
  splits/{train,validation,test}.jsonl
  metrics.jsonl          one JSON object per logging / evaluation event
  train_summary.json     steps, tokens, wall time, final losses
  checkpoints/           resumable checkpoints (each with a .complete marker)
  final/                 adapter (LoRA) or full model + tokenizer: the best checkpoint
  eval_test.json, report/   the end-of-training evaluation
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # -- recognising a run ----------------------------------------------------------
    @classmethod
    def find(cls, ref: str | Path) -> "RunDir | None":
        """The run at ``ref`` when it is a finished run (config.yaml and final/), else None."""
        run = cls(Path(ref))
        return run if run.is_finished() else None

    @classmethod
    def of_checkpoint(cls, ref: str | Path) -> "RunDir | None":
        """The run a ``RUN/checkpoints/checkpoint-N`` folder belongs to (None for anything else)."""
        path = Path(ref)
        run = cls(path.parent.parent)
        if path.parent.name == "checkpoints" and path.name.startswith("checkpoint-") and run.config_file.is_file():
            return run
        return None

    def is_finished(self) -> bool:
        return self.config_file.is_file() and self.final.is_dir()

    # -- layout ---------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest_file(self) -> Path:
        return self.path / "data_manifest.json"

    @property
    def splits(self) -> Path:
        return self.path / "splits"

    def split_file(self, split: str) -> Path:
        return self.splits / f"{split}.jsonl"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "train_summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def eval_file(self, split: str = "test") -> Path:
        return self.path / f"eval_{split}.json"

    def report_dir(self, split: str = "test") -> Path:
        return self.path / ("report" if split == "test" else f"report_{split}")

    @property
    def has_adapter(self) -> bool:
        return (self.final / "adapter_config.json").is_file()

    # -- contents -------------------------------------------------------------------
    def config(self):
        from medassist.config import load_config

        return load_config(self.config_file)

    def read_json(self, path: Path) -> dict[str, Any] | None:
        """A JSON file of the run, or None when it is missing or unreadable."""
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def manifest(self) -> dict[str, Any] | None:
        return self.read_json(self.manifest_file)

    def summary(self) -> dict[str, Any] | None:
        return self.read_json(self.summary_file)
