"""The Flower ServerApp: a strategy from `flwr.serverapp.strategy`, started on a tracking grid with
a round checkpointer, around the Trainer the run's `make_trainer` builds for the server.

Flower's `strategy.start` drives the rounds. `main` checks the run (`preflight.check_run`), builds
the server's Trainer (`TrainerContext(role="server")`: the initial model, what each round saves,
its central evaluation), the strategy, and adds two things around the strategy without touching
it: a `round_grid.TrackingGrid` that sends every message of a round and takes every reply through
`replies.RoundReplies` before aggregation; and an `evaluate_fn` (`rounds.RoundCheckpointer`) that,
at the end of every round, evaluates the aggregate with the server's Trainer and saves it. With
`--resume`, the strategy continues after the latest saved round (`ResumedStrategy`).
"""

from __future__ import annotations

from logging import INFO

from flwr.app import ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .. import hub
from ..arguments import FederationArguments, HubArguments
from ..arguments.run_config import group_from_run_config
from ..checkpoint import lock as run_lock
from ..context import SERVER, TrainerContext
from ..factory import build_trainer, load_factory, model_facts
from ..tasks import trainer_ref
from ..transport.averaging import averages_replies
from ..weights import get_weights, trainable_state_dict
from . import resume
from .preflight import check_run
from .replies import RoundRules
from .round_grid import TrackingGrid
from .rounds import RoundCheckpointer
from .strategies import ResumedStrategy, build_strategy, nodes_waited_for, set_strategy_state
from .validation import ExampleCap, ExpectedReply

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num_rounds` of the configured strategy and save every aggregated round."""
    run_config = dict(context.run_config)
    federation = group_from_run_config(FederationArguments, run_config)
    hub_args = group_from_run_config(HubArguments, run_config)
    # Under a launcher, this run claims the lease of the launcher's lock (once: a second run sent
    # to that SuperLink is refused); started by `flwr run .`, it locks the folder itself.
    run_lock.hold_for_process(federation.output_dir)
    partition_counts = check_run(run_config, prepare_output=True)
    ref = trainer_ref(federation, run_config)
    trainer_context = TrainerContext(
        role=SERVER, config=federation.trainer_config, num_rounds=federation.num_rounds, run_config=run_config
    )
    trainer = build_trainer(load_factory(ref), trainer_context, ref)
    model = trainer.model
    strategy = build_strategy(federation)
    # The trainable part only, in float32: what the strategy averages (the frozen rest never moves).
    initial_arrays = get_weights(model, "float32")
    rules = RoundRules(
        expected=ExpectedReply.for_run(federation, trainable_state_dict(model)),
        min_train_clients=federation.min_train_clients,
        example_cap=ExampleCap.for_run(federation.max_examples_per_client, partition_counts),
        average_on_arrival=federation.fast_transport and averages_replies(strategy),
    )
    tracking_grid = TrackingGrid(
        grid,
        rules,
        fast_transport=federation.fast_transport,
        wait_for_clients_timeout=federation.wait_for_clients_timeout,
        clients_wanted=nodes_waited_for(strategy),
    )
    resume_point = None
    if federation.resume:
        resume_point = resume.find_resume_point(federation.output_dir, federation.resume_from_round)
        resume.check_resumable(resume_point, model, federation.output_dir)
        shapes = {name: array.shape for name, array in initial_arrays.items()}
        state = resume.checked_strategy_state(resume_point.folder, federation, shapes)
        # A built-in task's launcher moved them once checked; a user's model is checked here.
        resume.set_aside_later_rounds(federation.output_dir, resume_point.round)
        initial_arrays = resume.load_round_arrays(resume_point.folder, model)
        if state is not None:
            set_strategy_state(strategy, *state)
        log(INFO, "Resuming after round %s from %s", resume_point.round, resume_point.folder)
    pusher = None
    if hub_args.push_to_hub:
        repo_id = hub.check_push_access(hub_args.hub_model_id)
        hub.create_repo(repo_id, private=hub_args.hub_private)
        pusher = hub.RoundPusher(repo_id)
    checkpointer = RoundCheckpointer(
        trainer, federation, hub_args, run_config, tracking_grid, strategy, resume_point, pusher
    )
    done = resume_point.round if resume_point else 0
    # Flower counts rounds from 1: a resumed run runs the remaining rounds, renumbered.
    runner = ResumedStrategy(strategy, done) if resume_point else strategy
    # What the server says of its model travels with every message: clients build the same.
    facts = model_facts(model)
    error = None
    try:
        runner.start(
            grid=tracking_grid,
            initial_arrays=initial_arrays,
            num_rounds=federation.num_rounds - done,
            timeout=federation.round_timeout,
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
