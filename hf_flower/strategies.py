"""A Flower strategy from its name: every strategy in `flwr.serverapp.strategy`, with its parameters."""

from __future__ import annotations

import inspect

import flwr.serverapp.strategy as flwr_strategies
from flwr.serverapp.strategy import FedAvg, Strategy

from .arguments import FederationArguments

# XGBoost strategies aggregate serialised trees, not tensors: they cannot train a transformer.
UNSUPPORTED = {"FedXgbBagging", "FedXgbCyclic"}
# Key under which a differential-privacy wrapper names the strategy it wraps.
WRAPPED_STRATEGY_KEY = "strategy"


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
