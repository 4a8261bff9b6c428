"""The Flower ServerApp: a strategy from `flwr.serverapp.strategy`, started on a tracking grid with
a round checkpointer.

Flower's `strategy.start` drives the rounds. `main` builds the model, the central test split and
the strategy, and adds two things around the strategy without touching it: a
`round_grid.TrackingGrid` that sees every message of a round (clients, failures, bytes) and
checks replies before aggregation, its messages carried by `transport.exchange`; and an
`evaluate_fn` (`rounds.RoundCheckpointer`) that, at the end of every round, evaluates the
aggregate on the server's test split and saves it. With `--resume`, the strategy continues after
the latest saved round (`ResumedStrategy`).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from transformers import set_seed

from .. import checkpoint, data, hub
from ..arguments import RunArguments
from ..arguments.run_config import from_run_config
from ..checkpoint import lock as run_lock
from ..modeling import load_tokenizer
from ..tasks import get_task
from ..transport.averaging import averages_replies
from ..weights import get_weights, trainable_state_dict
from . import resume
from .preflight import check_run, partition_sizes
from .round_grid import TrackingGrid
from .rounds import RoundCheckpointer
from .strategies import (
    ResumedStrategy,
    build_strategy,
    nodes_waited_for,
    set_strategy_state,
)
from .validation import ExampleCap, ExpectedReply

app = ServerApp()


def partition_counts(run_args: RunArguments) -> list[tuple[int, int]]:
    """The (train, eval) example counts a client of each of the run's partitions reports."""
    eval_size = run_args.data.client_eval_size
    return [data.client_split_sizes(size, eval_size) for size in partition_sizes(run_args)]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num_rounds` of the configured strategy and save every aggregated round."""
    run_args = from_run_config(context.run_config)
    # Under a launcher its lock covers this run; started by `flwr run .`, the run locks the folder.
    run_lock.hold_for_process(run_args.training.output_dir)
    task = get_task(run_args.model.task)
    facts = check_run(run_args, prepare_output=True)
    set_seed(run_args.training.seed)
    tokenizer = load_tokenizer(run_args.model)
    model = task.load_model(run_args, facts)
    test_set = task.central_test_set(run_args, tokenizer, facts)
    federation = run_args.federation
    strategy = build_strategy(federation)
    # The trainable part only, in float32: what the strategy averages (the frozen rest never moves).
    initial_arrays = get_weights(model, "float32")
    tracking_grid = TrackingGrid(
        grid,
        ExpectedReply.for_run(run_args, task, trainable_state_dict(model)),
        federation.min_train_clients,
        fast_transport=federation.fast_transport,
        average_on_arrival=federation.fast_transport and averages_replies(strategy),
        example_cap=ExampleCap.for_run(federation.max_examples_per_client, partition_counts(run_args)),
        wait_for_clients_timeout=federation.wait_for_clients_timeout,
        clients_wanted=nodes_waited_for(strategy),
    )
    resume_point = None
    if federation.resume:
        resume_point = resume.find_resume_point(run_args.training.output_dir)
        initial_arrays = resume.load_round_arrays(resume_point.folder, model, task.auto_model_class())
        state = checkpoint.read_strategy_state(resume_point.folder)
        if state is not None:
            set_strategy_state(strategy, *state)
        log(INFO, "Resuming after round %s from %s", resume_point.round, resume_point.folder)
    pusher = None
    if run_args.hub.push_to_hub:
        repo_id = hub.check_push_access(run_args.hub.hub_model_id)
        hub.create_repo(repo_id, private=run_args.hub.hub_private)
        pusher = hub.RoundPusher(repo_id)
    checkpointer = RoundCheckpointer(
        run_args, task, facts, model, tokenizer, test_set, tracking_grid, strategy, resume_point, pusher
    )
    done = resume_point.round if resume_point else 0
    # Flower counts rounds from 1: a resumed run runs the remaining rounds, renumbered.
    runner = ResumedStrategy(strategy, done) if resume_point else strategy
    error = None
    try:
        runner.start(
            grid=tracking_grid,
            initial_arrays=initial_arrays,
            num_rounds=federation.num_rounds - done,
            timeout=federation.round_timeout,
            # The run's facts (e.g. its classes) travel with every message: clients build their
            # model from them.
            train_config=ConfigRecord(dict(facts)),
            evaluate_config=ConfigRecord(dict(facts)),
            evaluate_fn=checkpointer,
        )
    except BaseException as err:
        error = err
        raise
    finally:
        unseen_error = checkpointer.finish(error)
    if unseen_error is not None:
        raise unseen_error
