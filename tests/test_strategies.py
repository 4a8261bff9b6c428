"""Every strategy Flower ships can be chosen by name, with its own parameters."""

import flwr.serverapp.strategy as flwr_strategies
import pytest

from hf_flower.arguments import FederationArguments
from hf_flower.server.strategies import StrategyError, available_strategies, build_strategy

REQUIRED = {
    "QFedAvg": {"client_learning_rate": 1e-4},
    "DifferentialPrivacyServerSideFixedClipping": {
        "noise_multiplier": 0.1,
        "clipping_norm": 1.0,
        "num_sampled_clients": 2,
    },
    "DifferentialPrivacyClientSideFixedClipping": {
        "noise_multiplier": 0.1,
        "clipping_norm": 1.0,
        "num_sampled_clients": 2,
    },
    "DifferentialPrivacyServerSideAdaptiveClipping": {"noise_multiplier": 0.1, "num_sampled_clients": 2},
    "DifferentialPrivacyClientSideAdaptiveClipping": {"noise_multiplier": 0.1, "num_sampled_clients": 2},
}


@pytest.mark.parametrize("name", available_strategies())
def test_every_strategy_builds(name):
    strategy = build_strategy(FederationArguments(strategy=name, strategy_kwargs=REQUIRED.get(name, {})))
    assert type(strategy).__name__ == name


def test_parameters_reach_the_strategy():
    federation = FederationArguments(
        strategy="fedprox",
        strategy_kwargs={"proximal_mu": 0.3},
        fraction_train=0.5,
        min_train_clients=3,
        min_available_clients=3,
        num_clients=4,
    )
    strategy = build_strategy(federation)
    assert isinstance(strategy, flwr_strategies.FedProx)
    assert (strategy.proximal_mu, strategy.fraction_train, strategy.min_train_nodes) == (0.3, 0.5, 3)


def test_dp_wrapper_wraps_named_strategy():
    kwargs = {**REQUIRED["DifferentialPrivacyServerSideFixedClipping"], "strategy": "FedAdam"}
    strategy = build_strategy(
        FederationArguments(strategy="DifferentialPrivacyServerSideFixedClipping", strategy_kwargs=kwargs)
    )
    assert isinstance(strategy.strategy, flwr_strategies.FedAdam)


def test_errors_name_the_fix():
    with pytest.raises(StrategyError, match="choose one of"):
        build_strategy(FederationArguments(strategy="FedFoo"))
    with pytest.raises(StrategyError, match=r"FedAvgM has no parameter\(s\) \['momentum'\]"):
        build_strategy(FederationArguments(strategy="FedAvgM", strategy_kwargs={"momentum": 0.9}))
