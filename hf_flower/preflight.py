"""Checks of a run's configuration that fail in seconds, before any Flower process or training starts."""

from __future__ import annotations

from . import checkpoint, hub, resume
from . import data as data_lib
from .arguments import RunArguments
from .modeling import check_num_labels, check_trainable, load_model_config
from .strategies import build_strategy, strategy_class


def check_federation(run_args: RunArguments) -> None:
    """Minimums that the number of clients can never satisfy would make the server wait forever."""
    federation = run_args.federation
    for name in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
        if getattr(federation, name) > federation.num_clients:
            raise ValueError(
                f"{name}={getattr(federation, name)} exceeds num_clients={federation.num_clients}: "
                f"the server would wait forever. Lower --{name} or raise --num_clients."
            )


def check_transfer(run_args: RunArguments) -> None:
    """Client-side clipping (Flower's DP mods) reads the weights with numpy, which has no bfloat16."""
    federation = run_args.federation
    client_side_dp = strategy_class(federation.strategy).__name__.startswith("DifferentialPrivacyClientSide")
    if client_side_dp and federation.transfer_dtype == "bfloat16":
        raise ValueError(
            f"{federation.strategy} clips updates on the client with numpy, which has no bfloat16: "
            "use --transfer_dtype float16 or float32 with it."
        )


def check_run(run_args: RunArguments, prepare_output: bool = False) -> list[str]:
    """Validate model, data, partitions, strategy, Hub access and output folder; return the label names.

    With `prepare_output`, also create `output_dir` (refusing one that already holds rounds unless
    `overwrite_output_dir`; with `resume`, checking that its rounds belong to this model and
    labels before anything in it is touched).
    """
    check_federation(run_args)
    build_strategy(run_args.federation)
    check_transfer(run_args)
    if run_args.hub.push_to_hub:
        hub.check_push_access(run_args.hub.hub_model_id)
    output_dir, federation = run_args.training.output_dir, run_args.federation
    if prepare_output and not federation.resume:
        checkpoint.prepare_output_dir(output_dir, federation.overwrite_output_dir)
    model_config = load_model_config(run_args.model)
    label_names = data_lib.load_label_names(run_args.data)
    check_num_labels(run_args.model, label_names)
    check_trainable(run_args.model, run_args.peft, len(label_names))
    if prepare_output and federation.resume:
        resume.check_resumable(output_dir, federation.num_rounds, model_config, label_names)
        checkpoint.prepare_output_dir(output_dir, overwrite=False, resume=True)
    data_lib.partition_sizes(run_args.data, run_args.federation.num_clients, run_args.training.seed)
    return label_names
