"""`TrainerContext`: what a user's `make_trainer(context)` is told when hf-flower calls it.

A user writes one factory, `make_trainer(context) -> transformers.Trainer`, and hf-flower calls it
wherever a Trainer is needed: on every client (each rank of an `accelerate launch`), on the server
(the initial model, what a round saves, central evaluation), and for a plain single-machine run.
The context says which of those it is, which data the caller serves, the round, and the settings of
the run. It is plain data: it imports neither torch nor Flower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

CLIENT, SERVER, LOCAL = "client", "server", "local"
ROLES = (CLIENT, SERVER, LOCAL)
# `TrainerContext.partition` shuffles with this seed unless told otherwise: every client of a run
# must cut the same permutation, whatever its own training seed.
PARTITION_SEED = 42


@dataclasses.dataclass(frozen=True)
class TrainerContext:
    """Who calls `make_trainer`, for which round, with which data and settings.

    Attributes:
        role: `"client"` (trains on its data each round), `"server"` (the initial model, what each
            round saves: `trainer.model` and `trainer.processing_class`, and central evaluation:
            `trainer.eval_dataset` with `trainer.compute_metrics`), or `"local"` (the plain
            single-machine run of the script, `python my_script.py train`).
        config: Your own settings for `make_trainer`, as given by whoever runs this process
            (`--trainer_config '{"model_name_or_path": "..."}'`, `simulate(trainer_config=...)`).
            In a simulation every process gets the operator's; a deployed client gets its own
            command line's, never the server's.
        num_rounds: Rounds of the federated training (1 for a local run).
        server_round: The round the Trainer is first used for (0 on the server: the initial model).
        partition_id, num_partitions: The partition of a shared data set this client serves
            (simulation, or `client --partition_id`); None elsewhere. `partition` cuts it.
        data_path: A deployed client's own data (`client --data_path`); None elsewhere.
        label_names: On a client, the classes of the server's model (its `id2label`, in id order),
            when it has them: a client whose own data holds only some classes builds the same head.
        run_config: Flower's run config of the run. On a deployed client it comes from the server:
            treat it as untrusted input there.
    """

    role: str
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_rounds: int = 1
    server_round: int = 0
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    label_names: tuple[str, ...] | None = None
    run_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"Unknown role {self.role!r}; choose one of {list(ROLES)}.")
        if (self.partition_id is None) != (self.num_partitions is None):
            raise ValueError("Give both partition_id and num_partitions, or neither.")
        if self.num_partitions is not None and not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(f"partition_id must be in [0, {self.num_partitions}), got {self.partition_id}.")

    @property
    def is_client(self) -> bool:
        return self.role == CLIENT

    @property
    def is_server(self) -> bool:
        return self.role == SERVER

    def partition(
        self, dataset: Dataset, partitioner: Partitioner | None = None, seed: int = PARTITION_SEED
    ) -> Dataset:
        """This client's share of `dataset`, a data set every client of the run can load.

        Without a partition (the server, a local run, a client with its own `--data_path`) the data
        set comes back whole. Otherwise partition `partition_id` of `num_partitions`: by default
        equal shares of the rows shuffled with `seed` (the same cut in every process), or what a
        `flwr_datasets` `partitioner` (e.g. `DirichletPartitioner(..., partition_by="label")`)
        gives, built for `num_partitions` partitions.
        """
        if self.num_partitions is None:
            return dataset
        if partitioner is None:
            if len(dataset) < self.num_partitions:
                raise ValueError(
                    f"{len(dataset)} examples cannot be split between {self.num_partitions} clients: "
                    "use fewer clients or more data."
                )
            return dataset.shuffle(seed=seed).shard(self.num_partitions, self.partition_id, contiguous=True)
        if partitioner.num_partitions != self.num_partitions:
            raise ValueError(
                f"The partitioner splits the data in {partitioner.num_partitions} partitions, the run has "
                f"{self.num_partitions} clients: build it with num_partitions={self.num_partitions}."
            )
        partitioner.dataset = dataset
        return partitioner.load_partition(self.partition_id)
