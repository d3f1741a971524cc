"""For tests/test_pairs.py under `accelerate launch`: make a config's pair store and have every rank write the
shard indices it made to DIR/rank<r>.json.

    accelerate launch ... tests/pairs_rank_log.py DIR CONFIG key=value ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from distill.data import pairs
from distill.training.preflight import load_config

if __name__ == "__main__":
    torch.set_num_threads(1)
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    made: list[int] = []
    real = pairs.make_shard

    def logged(teacher, pc, index, *args, **kwargs):
        made.append(index)
        return real(teacher, pc, index, *args, **kwargs)

    pairs.make_shard = logged
    pairs.generate_from_config(load_config(config, overrides))
    from accelerate import PartialState

    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{PartialState().process_index}.json").write_text(json.dumps(made))
