"""Where a run's checkpoints are and which are complete (folders being written are hidden `.tmp-*`)."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = "checkpoints"

CHECKPOINT_PREFIX = "step-"

TMP_PREFIX = ".tmp-"

STATE_FILE = "trainer_state.json"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (folders being written are hidden `.tmp-*` and never listed)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None
