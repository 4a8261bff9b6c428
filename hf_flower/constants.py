"""Names shared by the client and the server: record keys of Flower messages."""

# Keys Flower's strategies use by default (`arrayrecord_key`, `configrecord_key`, `weighted_by_key`).
ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
NUM_EXAMPLES_KEY = "num-examples"
SERVER_ROUND_KEY = "server-round"
# Our replies: one MetricRecord (Flower's strategies expect exactly one) and who sent it.
METRICS_KEY = "metrics"
CLIENT_KEY = "client"
PARTITION_ID_KEY = "partition-id"
# Node config of a SuperNode: which data it serves.
NUM_PARTITIONS_KEY = "num-partitions"
DATA_PATH_KEY = "data-path"
