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

    def add(
        self,
        arrays: Mapping[str, Array],
        weight: float,
        scale: float = 1.0,
        start: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Fold in `arrays` with `weight`; with `scale` < 1, their update from `start` (the weights
        sent) shortened to that share first: `start + scale * (arrays - start)`, the clipped reply."""
        with readonly_views():
            views = {name: decode_view(name, array) for name, array in arrays.items()}
        if self._sums is None:
            self._sums = {name: torch.zeros(view.shape, dtype=torch.float64) for name, view in views.items()}
        # In place and straight from the reply's bytes: no float64 copy of each reply.
        for name, view in views.items():
            if scale == 1.0 or not view.dtype.is_floating_point:
                self._sums[name].add_(view, alpha=weight)
            else:
                self._sums[name].add_(view, alpha=weight * scale).add_(
                    start[name], alpha=weight * (1 - scale)
                )
        self.total_weight += weight

    def mean(self) -> ArrayRecord:
        """The weighted mean, in float32."""
        if self._sums is None or self.total_weight <= 0:
            raise ValueError("RunningMean.mean() needs at least one record with a positive weight.")
        return state_dict_to_arrays({k: (s / self.total_weight).float() for k, s in self._sums.items()})


def scaled_update(
    arrays: Mapping[str, Array], start: Mapping[str, torch.Tensor], scale: float
) -> ArrayRecord:
    """`start + scale * (arrays - start)` in float32: a reply whose update from `start` (the weights
    it was sent) is shortened to `scale` of its length (`validation.UpdateClip`). Tensors that are
    not floating point pass through."""
    out = {}
    with readonly_views():
        for name, array in arrays.items():
            view = decode_view(name, array)
            if view.dtype.is_floating_point:
                base = start[name].float()
                out[name] = base + scale * (view.float() - base)
            else:
                out[name] = view.clone()
    return state_dict_to_arrays(out)
