"""Start-up work done once, or not before it is needed (issue 24): a process reads the run's data
source once, however many of its steps need it, and again only once its files change; partitioning
does not import flwr_datasets' plotting."""

import sys

import numpy as np
import pytest
from conftest import run_config_of, tiny_run_flags, trainer_for, write_reviews_csv

from hf_flower.arguments import DataArguments
from hf_flower.data import load_raw_splits, partition_rows, sources
from hf_flower.server.preflight import check_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def source_reads(monkeypatch):
    """The data sources read from here on, by a process that has read none yet."""
    reads = []
    load = sources._load_source

    def counted(data_args):
        reads.append(data_args.dataset)
        return load(data_args)

    monkeypatch.setattr(sources, "_last_read", None)
    monkeypatch.setattr(sources, "_load_source", counted)
    return reads


def test_the_serverapp_reads_the_data_once(tmp_path, tiny_model_dir, reviews_csv, source_reads):
    # The ServerApp's start: its checks (the classes, the partitions), then the server's Trainer
    # (the classes again, the test rows).
    run_config = run_config_of(tiny_run_flags(tmp_path / "run", tiny_model_dir, reviews_csv))
    check_run(run_config, prepare_output=True)
    trainer = trainer_for(run_config, "server")
    assert len(trainer.eval_dataset) == 40
    assert source_reads == [str(reviews_csv)]


def test_a_changed_file_is_read_again(tmp_path, source_reads):
    path = write_reviews_csv(tmp_path / "reviews.csv", num_rows=40)
    data_args = DataArguments(dataset=str(path))
    assert [len(load_raw_splits(data_args)[0]) for _ in range(2)] == [40, 40]
    assert len(source_reads) == 1
    write_reviews_csv(path, num_rows=50)
    assert len(load_raw_splits(data_args)[0]) == 50
    assert len(source_reads) == 2


def test_partitioning_leaves_flwr_datasets_plotting_unimported(monkeypatch):
    # As in a fresh process: flwr_datasets not imported yet (its entries come back after the test).
    for name in [n for n in sys.modules if n == "flwr_datasets" or n.startswith("flwr_datasets.")]:
        monkeypatch.delitem(sys.modules, name)
    rows = partition_rows(np.array([0, 1] * 10), DataArguments(client_eval_size=0.2), 2, seed=0)
    assert [len(part) for part in rows] == [10, 10]
    assert "plot_label_distributions" not in vars(sys.modules["flwr_datasets.visualization"])
    from flwr_datasets.visualization import plot_label_distributions  # a user's own plot still works

    assert callable(plot_label_distributions)
