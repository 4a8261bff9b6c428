"""One federated client: a SuperNode and a long-lived process that trains with `transformers.Trainer`.

On one CPU or GPU, against a server with a certificate from a public CA (the system's trusted CAs
verify it):

    hf-flower client --superlink server.example.org:9092 --data_path my_reviews.csv

Trying things out against an unencrypted server (`hf-flower server --insecure`) on this machine:

    hf-flower client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2

On every GPU of this machine (DDP through Accelerate; rank 0 talks to the SuperLink):

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --num_processes "$(nvidia-smi -L | wc -l)" \
        -m hf_flower.commands.client --superlink server.example.org:9092 --data_path my_reviews.csv

With the federation's own CA (`hf-flower make-certs`), SuperNode authentication, and only one model
(at one revision) that the server may make this client load:

    hf-flower client --superlink server.example.org:9092 --root_certificates certs/ca.crt \
        --auth_private_key keys/client-0 --data_path my_reviews.csv \
        --allowed_models sentence-transformers/all-MiniLM-L6-v2@main

With your own Trainer (a script whose `make_trainer(context)` builds it; `python my_script.py client
...` is the same, see `hf_flower.main`):

    hf-flower client --superlink server.example.org:9092 --trainer my_script.py:make_trainer \
        --trainer_config '{"model_name_or_path": "..."}' --data_path my_reviews.csv

With its own file, whose columns have their own names (it reads these and no others, whatever the
server's run config names):

    hf-flower client --superlink server.example.org:9092 --data_path my_reviews.csv \
        --text_column review --label_column sentiment

Trying things out with a model and a data set that sit on this machine (local paths are refused
unless listed):

    hf-flower client --superlink 127.0.0.1:9092 --insecure --partition_id 0 --num_partitions 2 \
        --allowed_models ./my-model --allowed_data ./reviews.csv

The run config the server sends is checked before it is used (`hf_flower/arguments/policy.py`):
a client runs its own Trainer factory or a built-in task, never one a server names; remote model
code only with --trust_remote_code; local models and data sets only when listed; no Hub token
unless --use_hub_token; Hub, file, tracking and process settings never. A failure is reported to
the server as its kind and a reference into the client's `--work_dir`/failures.log, never its text.
"""

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from ..arguments import parse_trainer_config
from ..arguments.policy import COLUMN_FIELDS, ClientPolicy
from ..factory import factory_ref
from ..launch.client import ClientOptions, run_client
from ..transport.supernode import DEFAULT_PULL_INTERVAL


@dataclass
class ClientArguments:
    """Which SuperLink to join and which data to serve.

    Args:
        superlink: Address of the SuperLink's Fleet API, `HOST:PORT`.
        partition_id / num_partitions: Serve partition `partition_id` of the run's data set, split
            in `num_partitions` (for trying things out on one machine).
        data_path: This client's own data (a .csv/.json/.jsonl/.parquet file or a `save_to_disk`
            folder), the real deployment case.
        root_certificates: CA certificate of the SuperLink; without it, the system's trusted CAs.
        insecure: Connect without TLS, on purpose (plaintext), e.g. to `hf-flower server --insecure`.
        trust_remote_code: Let the server's run load models that ship their own Python code.
        allowed_models: The only models (Hub ids or folders, `id@revision` to pin a revision) this
            client loads, comma-separated; any other is refused. Default: any Hub model, no local
            folder (a run config naming one is refused).
        allowed_data: The only data sets (Hub ids, local files or folders; a folder admits what is
            under it) a partition-mode client reads, comma-separated. Default: any Hub or packaged
            data set, no local path. A `--data_path` client never reads the run's data set.
        use_hub_token: Send this machine's Hugging Face token with the Hub downloads a run causes
            (private or gated models the server names). Default: no token.
        text_column / text_pair_column / label_column / prompt_column / completion_column /
            messages_column: This client's own columns: it reads these and no others, whatever the
            run config names (the run's names describe the server's data set). A run that reads a
            setting the client did not pin is refused.
        auth_private_key: Private key of this SuperNode (its `.pub` beside it), when the server
            enforces SuperNode authentication.
        superlink_timeout: Seconds to keep trying when the SuperLink cannot be reached, then exit.
        pull_interval: Seconds between the SuperNode's requests for work (Flower's default is 3).
        heartbeat_interval: Seconds between the SuperNode's heartbeats (10 to 1800; Flower's
            default is 30). The server declares a client dead after two missed ones, so a shorter
            interval frees a round from a crashed client sooner.
        work_dir: Folder for this client's logs.
        trainer: This client's Trainer factory, `module:function` or `path/to/script.py:function`
            (its `make_trainer`); without it, the built-in task the server's run names.
        trainer_config: Settings of that factory (`context.config`), a JSON object: this client's
            own, never the server's.
    """

    superlink: str = field(metadata={"help": "SuperLink address, HOST:PORT."})
    partition_id: int | None = field(default=None, metadata={"help": "Partition of the run's data set."})
    num_partitions: int | None = field(default=None, metadata={"help": "Number of partitions."})
    data_path: str | None = field(default=None, metadata={"help": "This client's own data file or folder."})
    root_certificates: str | None = field(
        default=None, metadata={"help": "CA certificate for TLS (default: the system's trusted CAs)."}
    )
    insecure: bool = field(default=False, metadata={"help": "Connect without TLS (plaintext), on purpose."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow runs whose model ships its own Python code."}
    )
    allowed_models: str | None = field(
        default=None,
        metadata={"help": "Only models this client loads: `id[@revision],...` (default: any Hub model)."},
    )
    allowed_data: str | None = field(
        default=None,
        metadata={
            "help": "Only data sets a partition-mode client reads: `name,...` (default: no local path)."
        },
    )
    use_hub_token: bool = field(
        default=False, metadata={"help": "Send this machine's Hub token with the downloads a run causes."}
    )
    text_column: str | None = field(default=None, metadata={"help": "This client's text column (pinned)."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "This client's second text column (pinned)."}
    )
    label_column: str | None = field(default=None, metadata={"help": "This client's label column (pinned)."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "This client's prompt column (pinned)."}
    )
    completion_column: str | None = field(
        default=None, metadata={"help": "This client's completion column (pinned)."}
    )
    messages_column: str | None = field(
        default=None, metadata={"help": "This client's chat messages column (pinned)."}
    )
    auth_private_key: str | None = field(default=None, metadata={"help": "SuperNode private key."})
    superlink_timeout: float = field(
        default=120.0, metadata={"help": "Seconds without a SuperLink before exiting."}
    )
    pull_interval: float = field(
        default=DEFAULT_PULL_INTERVAL, metadata={"help": "Seconds between the SuperNode's requests for work."}
    )
    heartbeat_interval: float | None = field(
        default=None, metadata={"help": "Seconds between heartbeats, 10-1800 (default: Flower's 30)."}
    )
    work_dir: str | None = field(default=None, metadata={"help": "Folder for the client's logs."})
    trainer: str | None = field(
        default=None, metadata={"help": "Trainer factory, `module:function` or `script.py:function`."}
    )
    trainer_config: str | None = field(
        default=None, metadata={"help": "Settings of the Trainer factory (context.config), a JSON object."}
    )

    def policy(self) -> ClientPolicy:
        """What this client lets a run do (`arguments.policy`)."""
        return ClientPolicy.from_flags(
            self.trust_remote_code,
            self.allowed_models,
            self.allowed_data,
            {name: getattr(self, name) for name in COLUMN_FIELDS},
            self.use_hub_token,
        )

    def node_config(self) -> dict:
        if self.pull_interval <= 0:
            raise ValueError(f"--pull_interval must be positive, got {self.pull_interval}.")
        if self.data_path is not None:
            if self.partition_id is not None:
                raise ValueError("Give either --data_path or --partition_id/--num_partitions, not both.")
            if not Path(self.data_path).exists():
                raise FileNotFoundError(f"--data_path {self.data_path} does not exist.")
            return {"data-path": str(Path(self.data_path).resolve())}
        if self.partition_id is None or self.num_partitions is None:
            raise ValueError("Give --partition_id and --num_partitions, or --data_path.")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(
                f"--partition_id must be in [0, {self.num_partitions}), got {self.partition_id}."
            )
        return {"partition-id": self.partition_id, "num-partitions": self.num_partitions}


def main(argv: list[str] | None = None, factory=None) -> int:
    """`hf-flower client ARGS`; `factory`: the `make_trainer` of the script that runs it
    (`hf_flower.main`), which then takes no `--trainer`."""
    (args,) = HfArgumentParser(ClientArguments).parse_args_into_dataclasses(argv)
    try:
        if factory is not None and args.trainer:
            raise ValueError("--trainer: this script's own make_trainer is the client's Trainer factory.")
        options = ClientOptions(
            trainer=factory_ref(factory or args.trainer) if (factory or args.trainer) else None,
            factory=factory,
            trainer_config=parse_trainer_config(args.trainer_config),
            superlink=args.superlink,
            node_config=args.node_config(),
            work_dir=Path(args.work_dir or tempfile.mkdtemp(prefix="hf-flower-client-")),
            root_certificates=args.root_certificates,
            insecure=args.insecure,
            policy=args.policy(),
            auth_private_key=args.auth_private_key,
            superlink_timeout=args.superlink_timeout,
            pull_interval=args.pull_interval,
            heartbeat_interval=args.heartbeat_interval,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_client(options)


if __name__ == "__main__":
    sys.exit(main())
