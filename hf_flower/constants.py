"""Names shared by the client and the server: the package version and the record keys of Flower messages."""

# The one place of the version (pyproject reads it: `[tool.setuptools.dynamic]`).
VERSION = "0.1.0"

# Keys Flower's strategies use by default (`arrayrecord_key`, `configrecord_key`, `weighted_by_key`).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"
SERVER_ROUND_KEY = "server-round"
# What the server says of its model with every message (`factory.model_facts`): its class, and its
# classes in label-id order (`config.id2label`); a client builds the same and is checked against it.
MODEL_CLASS_KEY = "model-class"
LABEL_NAMES_KEY = "label-names"
MAX_LABELS = 100_000
# Our replies: one MetricRecord (Flower's strategies expect exactly one) and who sent it.
METRICS_KEY = "metrics"
CLIENT_KEY = "client"
PARTITION_ID_KEY = "partition-id"
# Node config of a SuperNode: which data it serves.
NUM_PARTITIONS_KEY = "num-partitions"
DATA_PATH_KEY = "data-path"
# Weights a long-lived client already holds need not travel again (transport/client_loop.py keeps the
# last ones it received). The server names the weights of every message by their Flower object
# id; a client that holds them says so in its reply; a message to it may then carry the id alone.
ARRAYS_ID_KEY = "arrays-id"
ARRAYS_HELD_KEY = "arrays-held"
# Error code of a client asked for weights by id that it does not hold: the server resends them.
ARRAYS_NOT_HELD_CODE = 4601
# Between the server and long-lived clients the weights travel as one flat array (`transport/wire.py`).
PACKED_ARRAYS_KEY = "packed-arrays"
PACKED_LAYOUT_KEY = "packed-layout"
