"""The end of every round: central evaluation, then the round saved, recorded, tracked, pushed and
printed.

`RoundCheckpointer` is the `evaluate_fn` of `strategy.start`: Flower calls it with each round's
aggregate (after any differential-privacy noise). It is the one place a round is written: the
folder (the server Trainer's model and processing class, strategy state, model card and plot,
`checkpoint.save_round`), history.json, TensorBoard (`tracking`), the Hub push (`hub.RoundPusher`)
and the progress line. Central evaluation is the server Trainer's own `evaluate()` on its
`eval_dataset`, with its `compute_metrics`. What the clients did in the round comes from the grid's
record of it (`replies.RoundStats`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from logging import ERROR, INFO

import torch
from flwr.app import ArrayRecord, MessageType, MetricRecord
from flwr.common.logger import log
from transformers import Trainer

from .. import adapters, checkpoint, hub, model_card
from ..arguments import FederationArguments, HubArguments
from ..factory import model_facts
from ..modeling import release_freed_memory
from ..progress import lines as progress
from ..weights import set_weights
from . import resume
from .evaluation_placement import EvaluationPlan, yield_cpu
from .replies import RoundStats
from .round_grid import TrackingGrid
from .strategies import get_strategy_state
from .tracking import RoundTracker


class HubPushError(RuntimeError):
    """Rounds were trained and saved, but pushing some of them to the Hub failed."""


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op threads set to `count` inside the block (None: left as they are).

    For the calling thread: torch's OpenMP keeps the count per thread, and the strategy's thread
    keeps its own while the worker evaluates with fewer (checked with torch 2.13: 2 and 1). What
    changes for the whole process, inside the block, is the count a thread that first uses torch
    starts with.
    """
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def round_record(server_round: int, seconds: float, stats: RoundStats) -> dict:
    """A round's entry in history.json, from what the grid saw of it (`stats`); `seconds`: its
    federated part. Central metrics are filled in once the server has evaluated the round."""
    return {
        "round": server_round,
        # The federated part; when the server evaluates in between, its evaluation is added.
        "seconds": round(seconds, 2),
        "clients": {
            "train_sampled": stats.sampled.get(MessageType.TRAIN, 0),
            "train_succeeded": stats.succeeded.get(MessageType.TRAIN, 0),
            "evaluate_sampled": stats.sampled.get(MessageType.EVALUATE, 0),
            "evaluate_succeeded": stats.succeeded.get(MessageType.EVALUATE, 0),
        },
        "train": stats.metrics.get(MessageType.TRAIN, {}),
        "evaluate": stats.metrics.get(MessageType.EVALUATE, {}),
        "central": {},
        "client_results": stats.clients,
        "failures": list(stats.failures),
        "notes": list(stats.notes),
        "bytes_sent": stats.bytes_sent,
        "bytes_received": stats.bytes_received,
    }


def central_metrics(trainer: Trainer, server_round: int) -> dict[str, float]:
    """Every number the server Trainer's `evaluate()` reports for the model it holds: its loss and
    its `compute_metrics` on its `eval_dataset`. The Trainer's step is the round, so what its own
    `report_to` integrations log lines up with the rounds."""
    trainer.state.global_step = server_round
    metrics = trainer.evaluate()
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class RoundCheckpointer:
    """`evaluate_fn` of `strategy.start`: central evaluation, then the round saved, logged and pushed.

    With `--evaluate_in_background` (the default) that work runs on a background worker, one round
    after the other, while the strategy goes on with the next round: the clients never wait for
    the server's evaluation, and it takes only the CPU they leave (`evaluation_placement`; the
    run's log says where and how it runs). Each round's record (clients, metrics, bytes) is taken
    when the round ends, so the history is the same either way.

    `resume_point` is the round a resumed run continues from: `strategy.start` counts from 0
    again, so its round `r` is round `resume_point.round + r`, and its round 0 (the weights of the
    resumed round, already saved) is not saved again.
    """

    def __init__(
        self,
        trainer: Trainer,
        federation: FederationArguments,
        hub_args: HubArguments,
        run_config: dict,
        grid: TrackingGrid,
        strategy=None,
        resume_point: resume.ResumePoint | None = None,
        pusher: hub.RoundPusher | None = None,
    ):
        self.trainer = trainer
        self.federation = federation
        self.hub_args = hub_args
        self.grid = grid
        self.strategy = strategy
        self.pusher = pusher
        self.card = model_card.CardFacts.of(trainer, federation, hub_args)
        self.first_round = resume_point.round if resume_point else 0
        self.history = {
            "status": "running",
            "error": None,
            "num_rounds": federation.num_rounds,
            "run_config": dict(run_config),
            "model": model_facts(trainer.model),
            "best_metric": self.card.best_metric,
            "rounds": list(resume_point.rounds) if resume_point else [],
        }
        if resume_point:
            self.history["resumed_after"] = resume_point.round
        if trainer.eval_dataset is None:
            log(
                INFO, "The server's Trainer has no eval_dataset: rounds are saved without central evaluation."
            )
        self.output_dir = federation.output_dir
        self.tracker = RoundTracker(self.output_dir, trainer.args.report_to)
        self.round_started = time.time()
        # One worker, so rounds are evaluated and written in order. It yields the CPU to the
        # training clients: it runs at the lowest priority (`evaluation_placement`).
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="round-checkpointer")
        self.pending: list[concurrent.futures.Future] = []
        priority = self.worker.submit(yield_cpu).result() if federation.evaluate_in_background else None
        self.placement = EvaluationPlan.of(federation, str(trainer.args.device), priority)
        if trainer.eval_dataset is not None:
            log(INFO, "%s", self.placement.describe())
        # Set once the last round is handed over: from then on no client trains.
        self.clients_done = False

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate and save the round, or with `--evaluate_in_background` hand it to the worker
        and return at once (an earlier round's failure on the worker is raised here)."""
        server_round += self.first_round
        if self.first_round and server_round == self.first_round:
            return None  # the resumed round: evaluated and saved by the interrupted run
        self._raise_failed()
        # What describes the round is read now, on the strategy's thread, before it moves on.
        stats = self.grid.rounds.get(server_round, RoundStats())
        record = round_record(server_round, time.time() - self.round_started, stats)
        strategy_state = get_strategy_state(self.strategy) if self.strategy is not None else None
        central = None
        self.clients_done = server_round >= self.federation.num_rounds
        if self.federation.evaluate_in_background:
            self.pending.append(
                self.worker.submit(self._finish_round, record, arrays, strategy_state, beside_clients=True)
            )
        else:
            central = self._finish_round(record, arrays, strategy_state)
        self.round_started = time.time()
        # Flower's own result history gets the central metrics when they exist by now.
        return MetricRecord({k: v for k, v in central.items() if k.startswith("eval_")}) if central else None

    def _finish_round(self, record: dict, arrays: ArrayRecord, strategy_state, beside_clients=False) -> dict:
        """Central evaluation, then the round saved, logged and pushed (`beside_clients`: on the
        worker, while the next round trains). Returns the central metrics."""
        set_weights(self.trainer.model, arrays)
        federation = self.federation
        evaluates = self.trainer.eval_dataset is not None
        if evaluates and (record["round"] > 0 or federation.evaluate_initial_model):
            # Beside training clients, the threads of the cores they leave: torch's default would
            # take every core they use (2 threads beside 2 clients on 2 cores made rounds 55-66 s
            # instead of 49 s). Once the last round is handed over, every thread.
            beside_training = beside_clients and not self.clients_done
            with torch_threads(self.placement.threads if beside_training else None):
                record["central"] = central_metrics(self.trainer, record["round"])
            if not beside_clients:
                record["seconds"] = round(record["seconds"] + record["central"].get("eval_runtime", 0.0), 2)
        server_round = record["round"]
        rounds = [*self.history["rounds"], record]
        folder = checkpoint.save_round(
            self.output_dir,
            server_round,
            lambda folder: self._write_round(folder, rounds, strategy_state),
            record,
        )
        self.history["rounds"] = rounds
        checkpoint.write_history(self.output_dir, self.history)
        self.tracker.log_round(record)
        if self.pusher is not None and self.hub_args.hub_strategy == "every_round":
            self.pusher.submit(server_round, folder)
        log(INFO, "%s", progress.format_round(record, federation.num_rounds))
        release_freed_memory()  # what the evaluation and the save freed, while clients train
        return record["central"]

    def _raise_failed(self) -> None:
        """Re-raise, on the strategy's thread, the error of a round the worker could not finish."""
        for future in [f for f in self.pending if f.done()]:
            self.pending.remove(future)
            future.result()

    def _write_round(self, folder, rounds: list[dict], strategy_state) -> None:
        """Everything of a round but metrics.json, inside `save_round`'s atomic folder."""
        adapters.save_model(
            self.trainer.model, self.trainer.processing_class, folder, self.federation.save_merged
        )
        if strategy_state is not None:
            checkpoint.write_strategy_state(folder, *strategy_state)
        model_card.write_card(folder, self.card, rounds)

    def finish(self, error: BaseException | None) -> BaseException | None:
        """Wait for the last rounds and uploads; record how the run ended, and the best round, in
        history.json.

        Returns the error to raise that the strategy did not see: a round the worker could not
        finish, or pushes that failed when the user did not allow it.
        """
        worker_error = self._wait_for_worker()
        error = error or worker_error
        push_error = self._finish_pushes(last_round_ok=error is None)
        error = error or push_error
        self.history["status"] = "failed" if error else "completed"
        self.history["error"] = f"{type(error).__name__}: {error}" if error else None
        args = self.trainer.args
        self.history["best_round"] = checkpoint.best_round(
            self.history, f"central.{self.card.best_metric}", bool(args.greater_is_better)
        )
        try:
            checkpoint.write_history(self.output_dir, self.history)
        except OSError as write_error:  # e.g. a full disk
            if error is None:
                raise
            # The run's own error is what the user must see: report it first, and let it propagate.
            log(ERROR, "The run failed: %s: %s", type(error).__name__, error)
            log(ERROR, "Recording that in %s failed too: %s", checkpoint.HISTORY_FILE, write_error)
        self.tracker.close()
        return worker_error or push_error

    def _wait_for_worker(self) -> Exception | None:
        """Wait for the rounds still on the worker, in order; the first one's error, if any failed."""
        worker_error = None
        for future in self.pending:  # the rounds still on the worker, in order
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - the first failure becomes the run's error
                worker_error = worker_error or err
        self.pending.clear()
        self.worker.shutdown()
        return worker_error

    def _finish_pushes(self, last_round_ok: bool) -> HubPushError | None:
        """Push the last round (`--hub_strategy end`, when the run succeeded so far), wait for every
        upload and record them in the history; the error to raise if some failed and the user did
        not allow it."""
        push_error = None
        rounds = self.history["rounds"]
        if self.pusher is not None:
            if self.hub_args.hub_strategy == "end" and last_round_ok and rounds:
                last = rounds[-1]["round"]
                self.pusher.submit(last, checkpoint.round_dir(self.output_dir, last))
            failures = self.pusher.wait()
            self.history["hub"] = {
                "repo_id": self.pusher.repo_id,
                "pushed": sorted(self.pusher.pushed),
                "failed": {str(k): v for k, v in sorted(failures.items())},
            }
            if failures:
                push_error = HubPushError(
                    f"pushing round(s) {sorted(failures)} to {self.pusher.repo_id} failed (the rounds are "
                    f"kept in {self.output_dir}; push them with scripts/push.py): "
                    + "; ".join(f"round {k}: {v}" for k, v in sorted(failures.items()))
                )
                log(ERROR, "%s", push_error)
                if self.hub_args.hub_allow_push_failure:
                    push_error = None
        return push_error
