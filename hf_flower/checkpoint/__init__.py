"""Round checkpoints on disk: `round-N` folders written atomically, `history.json`, the latest round.

The server saves every aggregated round as a folder that `from_pretrained` loads directly. This
module owns that layout; nothing else reads or writes it by hand:

```
<output_dir>/
  round-0/  round-1/ ...   config.json, model.safetensors (or adapter_config.json,
                           adapter_model.safetensors [, merged/]), tokenizer files, metrics.json
                           (aggregates only), README.md (model card) + metrics.png,
                           strategy_state.safetensors (the strategy's own state, for --resume),
                           checksums.json (size and sha256 of every other file)
  history.json             {"status": "running"|"completed"|"failed"|"interrupted", "error": str|null,
                            "rounds": [<record of each round, per-client details included>], ...}
  runs/                    TensorBoard event files of the server's per-round metrics
  set-aside-<time>/        rounds a resumed run moved out of its way (never deleted)
```

A round is written into a hidden temporary folder (`.round-N.tmp-<pid>-<random>`) and renamed to
`round-N` only once every file is on disk, so a crash never leaves a `round-N` that fails to load:
a reader either sees the complete round or no round. `history.json` is replaced atomically too.
Leftovers of a crashed run are hidden names that `list_rounds` ignores and `prepare_output_dir`
removes, unless the process named in them still runs. A round damaged later (a copy cut short,
a full disk, a bad sector) is found by `verify_round` against its checksums.json before anything
loads it. One run writes to an output folder at a time (`run_lock` sees to that).
"""

from __future__ import annotations

from .history import (
    aggregate_metrics,
    best_round,
    mark_interrupted,
    read_history,
    read_round_metrics,
    write_history,
)
from .layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    AGGREGATE_KEYS,
    CARD_FILE,
    CHECKSUMS_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    HISTORY_STATUSES,
    METRICS_FILE,
    OLD_ROUND_MARKER,
    PLOT_FILE,
    ROUND_PREFIX,
    SET_ASIDE_PREFIX,
    STRATEGY_STATE_FILE,
    STRATEGY_STATE_METADATA_KEY,
    TENSORBOARD_DIR,
    TMP_HISTORY_PREFIX,
    TMP_ROUND_MARKER,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    WRITE_PROBE_PREFIX,
    DamagedRoundError,
    OutputDirError,
    is_complete_round,
    latest_round,
    list_rounds,
    round_dir,
)
from .rounds import (
    make_output_dir,
    metrics_json,
    prepare_output_dir,
    read_strategy_state,
    save_round,
    set_aside_rounds_after,
    write_strategy_state,
)
from .verify import checked_files, verify_round

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AGGREGATE_KEYS",
    "CARD_FILE",
    "CHECKSUMS_FILE",
    "CONFIG_FILE",
    "DamagedRoundError",
    "HISTORY_FILE",
    "HISTORY_STATUSES",
    "METRICS_FILE",
    "OLD_ROUND_MARKER",
    "OutputDirError",
    "PLOT_FILE",
    "ROUND_PREFIX",
    "SET_ASIDE_PREFIX",
    "STRATEGY_STATE_FILE",
    "STRATEGY_STATE_METADATA_KEY",
    "TENSORBOARD_DIR",
    "TMP_HISTORY_PREFIX",
    "TMP_ROUND_MARKER",
    "WEIGHTS_FILE",
    "WEIGHTS_INDEX_FILE",
    "WRITE_PROBE_PREFIX",
    "aggregate_metrics",
    "best_round",
    "checked_files",
    "is_complete_round",
    "latest_round",
    "list_rounds",
    "make_output_dir",
    "metrics_json",
    "mark_interrupted",
    "prepare_output_dir",
    "read_history",
    "read_round_metrics",
    "read_strategy_state",
    "round_dir",
    "save_round",
    "set_aside_rounds_after",
    "verify_round",
    "write_history",
    "write_strategy_state",
]
