"""Averaging training replies as they arrive, next to the strategies for which that is exact.

FedAvg's mean of a round's replies needs every client's weights in memory at once (50 clients'
float32 MiniLM replies are 4.5 GB). For the strategies in `AVERAGING_STRATEGIES`, whose
aggregation starts from that examples-weighted mean, the server instead folds each reply into a
`RunningMean` as it arrives and hands the strategy one reply holding the mean
(`round_grid.TrackingGrid`): the server's memory stays one model however many clients a round
samples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

# The codec of `weights.py`: each reply is read in place from the message bytes.
from ..weights import decode_view, readonly_views, state_dict_to_arrays

# Strategies whose `aggregate_train` starts from FedAvg's examples-weighted mean of the replies
# (FedAvgM and FedOpt add their server-side step to it): for them, one reply holding that mean
# aggregates exactly like all the replies. Robust aggregators (median, Krum, ...) and the
# differential-privacy wrappers need every reply.
AVERAGING_STRATEGIES = frozenset({"FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"})


def averages_replies(strategy: Strategy) -> bool:
    """Whether `strategy` aggregates training replies by their examples-weighted mean."""
    return type(strategy).__name__ in AVERAGING_STRATEGIES


class RunningMean:
    """The weighted mean of ``ArrayRecord``s added one at a time, without keeping them.

    What FedAvg computes from the list of all replies, folded in as each reply arrives: the
    server then holds one float64 sum instead of every client's weights (50 clients' float32
    MiniLM replies are 4.5 GB). float64 keeps the result within float32 rounding of FedAvg's.
    """

    def __init__(self):
        self._sums: dict[str, torch.Tensor] | None = None
        self.total_weight = 0.0

    def add(self, arrays: Mapping[str, Array], weight: float) -> None:
        with readonly_views():
            views = {name: decode_view(name, array) for name, array in arrays.items()}
        # In place and straight from the reply's bytes: no float64 copy of each reply.
        if self._sums is None:
            self._sums = {name: view.double().mul_(weight) for name, view in views.items()}
        else:
            for name, view in views.items():
                self._sums[name].add_(view, alpha=weight)
        self.total_weight += weight

    def mean(self) -> ArrayRecord:
        """The weighted mean, in float32."""
        if self._sums is None or self.total_weight <= 0:
            raise ValueError("RunningMean.mean() needs at least one record with a positive weight.")
        return state_dict_to_arrays({k: (s / self.total_weight).float() for k, s in self._sums.items()})
