"""A Flower strategy from its name: every strategy in `flwr.serverapp.strategy`, with its parameters.

Also the strategy's own state between rounds (for `--resume`) and a wrapper that continues a
strategy at a later round.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from logging import INFO

import flwr.serverapp.strategy as flwr_strategies
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from ..arguments import FederationArguments

# XGBoost strategies aggregate serialised trees, not tensors: they cannot train a transformer.
UNSUPPORTED = {"FedXgbBagging", "FedXgbCyclic"}
# Key under which a differential-privacy wrapper names the strategy it wraps.
WRAPPED_STRATEGY_KEY = "strategy"
# Attributes in which Flower 1.42's strategies carry state from one round to the next: the
# server-optimiser moments of FedAdam/FedYogi/FedAdagrad (dicts of arrays), FedAvgM's momentum
# (a list of arrays) and the adaptive-clipping norm of the DP wrappers (a float). Everything else
# a strategy keeps (`current_arrays`) is rebuilt from the round's weights in `configure_train`.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "clipping_norm")


class StrategyError(ValueError):
    """The strategy name or one of its parameters is not valid."""


def available_strategies() -> list[str]:
    """Names accepted by `--strategy`."""
    return sorted(
        name
        for name, obj in vars(flwr_strategies).items()
        if inspect.isclass(obj)
        and issubclass(obj, Strategy)
        and obj is not Strategy
        and name not in UNSUPPORTED
    )


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class called `name` (case-insensitive)."""
    by_lower = {n.lower(): n for n in available_strategies()}
    if name.lower() not in by_lower:
        raise StrategyError(f"Unknown strategy {name!r}; choose one of {available_strategies()}.")
    return getattr(flwr_strategies, by_lower[name.lower()])


def _sampling_kwargs(federation: FederationArguments) -> dict:
    return {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": federation.fraction_evaluate,
        "min_train_nodes": federation.min_train_clients,
        "min_evaluate_nodes": federation.min_evaluate_clients,
        "min_available_nodes": federation.min_available_clients,
    }


def _instantiate(cls: type[Strategy], kwargs: dict) -> Strategy:
    parameters = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        accepted = [p for p in parameters if p != "self"]
        raise StrategyError(f"{cls.__name__} has no parameter(s) {unknown}; it accepts {accepted}.")
    missing = [
        name
        for name, p in parameters.items()
        if name != "self" and p.default is inspect.Parameter.empty and name not in kwargs
    ]
    if missing:
        raise StrategyError(f"{cls.__name__} needs {missing}: set them in --strategy_kwargs.")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise StrategyError(f"{cls.__name__}({kwargs}) failed: {err}") from None


def build_strategy(federation: FederationArguments) -> Strategy:
    """Instantiate `federation.strategy` with the sampling settings and `strategy_kwargs`.

    Differential-privacy wrappers wrap another strategy, named by `strategy_kwargs["strategy"]`
    (FedAvg by default), which gets the sampling settings.
    """
    cls = strategy_class(federation.strategy)
    kwargs = dict(federation.strategy_kwargs)
    if WRAPPED_STRATEGY_KEY in inspect.signature(cls.__init__).parameters:
        inner_name = kwargs.pop(WRAPPED_STRATEGY_KEY, FedAvg.__name__)
        inner = strategy_class(inner_name)
        if WRAPPED_STRATEGY_KEY in inspect.signature(inner.__init__).parameters:
            raise StrategyError(f"{cls.__name__} must wrap a plain strategy, not {inner.__name__}.")
        kwargs[WRAPPED_STRATEGY_KEY] = _instantiate(inner, _sampling_kwargs(federation))
    else:
        kwargs = {**_sampling_kwargs(federation), **kwargs}
    return _instantiate(cls, kwargs)


# --- state between rounds (--resume) ----------------------------------------------------------


def _stateful_parts(strategy: Strategy) -> list[tuple[str, Strategy]]:
    """The strategy and, for a differential-privacy wrapper, the strategy it wraps, with prefixes."""
    parts = [("", strategy)]
    inner = getattr(strategy, WRAPPED_STRATEGY_KEY, None)
    if isinstance(inner, Strategy):
        parts.append((f"{WRAPPED_STRATEGY_KEY}.", inner))
    return parts


def get_strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict]:
    """`(tensors, metadata)`: the state `strategy` carries to the next round, ready for safetensors.

    Arrays of a dict attribute are named `<attr>/<key>`, of a list attribute `<attr>/<index>`;
    scalars and `None` go in the metadata, with the strategy's class names to check on load.
    """
    tensors: dict[str, np.ndarray] = {}
    metadata: dict = {
        "strategies": [type(part).__name__ for _, part in _stateful_parts(strategy)],
        "state": {},
    }
    for prefix, part in _stateful_parts(strategy):
        for attr in STATE_ATTRIBUTES:
            if not hasattr(part, attr):
                continue
            name, value = prefix + attr, getattr(part, attr)
            if isinstance(value, dict):
                tensors.update({f"{name}/{key}": np.asarray(array) for key, array in value.items()})
                metadata["state"][name] = {"kind": "dict", "keys": list(value)}
            elif isinstance(value, (list, tuple)):
                tensors.update({f"{name}/{i}": np.asarray(array) for i, array in enumerate(value)})
                metadata["state"][name] = {"kind": "list", "length": len(value)}
            elif value is None or isinstance(value, (int, float)):
                metadata["state"][name] = {"kind": "value", "value": value}
            else:
                raise TypeError(f"cannot save {type(part).__name__}.{attr} of type {type(value).__name__}")
    return tensors, metadata


def set_strategy_state(strategy: Strategy, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    """Restore what `get_strategy_state` saved into a freshly built `strategy` of the same kind."""
    saved = metadata.get("strategies")
    ours = [type(part).__name__ for _, part in _stateful_parts(strategy)]
    if saved != ours:
        raise StrategyError(
            f"the rounds to resume were trained with strategy {' wrapping '.join(saved or ['?'])}, this run "
            f"uses {' wrapping '.join(ours)}; resume with the strategy the run started with"
        )
    for prefix, part in _stateful_parts(strategy):
        for attr in STATE_ATTRIBUTES:
            entry = metadata["state"].get(prefix + attr)
            if entry is None or not hasattr(part, attr):
                continue
            name = prefix + attr
            if entry["kind"] == "dict":
                setattr(part, attr, {key: tensors[f"{name}/{key}"] for key in entry["keys"]})
            elif entry["kind"] == "list":
                setattr(part, attr, [tensors[f"{name}/{i}"] for i in range(entry["length"])])
            else:
                setattr(part, attr, entry["value"])


class ResumedStrategy(Strategy):
    """`strategy` continued after `rounds_done` rounds.

    Flower's `Strategy.start` always counts rounds from 1. Run it for the remaining rounds through
    this wrapper and the wrapped strategy, the messages (so every client's `server-round`) and
    anything keyed by round see the true round numbers: round 1 of `start` is round
    `rounds_done + 1`. (Only Flower's own log lines, `[ROUND 1/2]`, count from 1.)
    """

    def __init__(self, strategy: Strategy, rounds_done: int):
        self.strategy = strategy
        self.rounds_done = rounds_done

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.rounds_done, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.rounds_done, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.rounds_done, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.rounds_done, replies)

    def summary(self) -> None:
        log(INFO, "\t├──> Resumed after round %s", self.rounds_done)
        self.strategy.summary()


def nodes_waited_for(strategy: Strategy) -> int:
    """How many connected nodes `strategy` waits for before it samples a round: the most of its
    `min_available_nodes` and the minimums it samples for training and (when it evaluates)
    evaluation, those of the strategy a differential-privacy wrapper wraps included."""
    wanted = 0
    for _, part in _stateful_parts(strategy):
        minimums = [getattr(part, "min_available_nodes", 0), getattr(part, "min_train_nodes", 0)]
        if getattr(part, "fraction_evaluate", 0.0) > 0:
            minimums.append(getattr(part, "min_evaluate_nodes", 0))
        wanted = max(wanted, *minimums)
    return wanted
