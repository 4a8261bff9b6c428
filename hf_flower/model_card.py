"""Model cards and per-round plots: every round folder gets a README.md and a metrics.png.

The card is rendered with `huggingface_hub.ModelCard.from_template` from the packaged template
`hf_flower/templates/model_card.md` (Jinja): metadata the Hub indexes (`base_model`, `datasets`,
`license`, tags, `model-index` with the central test results), the federated setup, a table of
metrics per round, the plot, and how to load the model and a given round (`revision="round-N"`).
The plot is drawn with matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import checkpoint
from .arguments import (
    OFFLINE_CHAT_DATASET,
    OFFLINE_DATASET,
    OFFLINE_MODEL,
    RunArguments,
)
from .tasks import RunFacts, Task

# Package data (pyproject `[tool.setuptools.package-data]`): beside this module in a checkout, an
# installed wheel and the Flower app folder the launchers write (`launch/app.py`).
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# The reviews of the offline data sets are IMDB's train split, so the card names IMDB on the Hub.
OFFLINE_DATASET_HUB_ID = "stanfordnlp/imdb"
TAGS = ["federated-learning", "flower", "hf-flower"]


def _hub_id(name: str) -> str | None:
    """`name` when it looks like a Hub id rather than a local path (the Hub only links ids)."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _dataset_id(run_args: RunArguments) -> str | None:
    dataset = run_args.data.dataset
    return OFFLINE_DATASET_HUB_ID if dataset in (OFFLINE_DATASET, OFFLINE_CHAT_DATASET) else _hub_id(dataset)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _setup(run_args: RunArguments) -> list[tuple[str, str]]:
    federation, data, training = run_args.federation, run_args.data, run_args.training
    partitioning = data.partitioner
    if data.partitioner == "dirichlet":
        partitioning += f" (label skew, alpha={data.dirichlet_alpha})"
    per_round = max(federation.min_train_clients, round(federation.fraction_train * federation.num_clients))
    strategy = federation.strategy
    if federation.strategy_kwargs:
        strategy += f" `{json.dumps(federation.strategy_kwargs, sort_keys=True)}`"
    rows = [
        ("strategy", strategy),
        ("clients", str(federation.num_clients)),
        ("clients per round", f"{per_round} (fraction_train={federation.fraction_train})"),
        ("rounds", str(federation.num_rounds)),
        ("local epochs per round", f"{federation.local_epochs:g}"),
        ("partitioning", partitioning),
        ("dataset", data.dataset if _dataset_id(run_args) else Path(data.dataset).name),
        ("max_length", str(data.max_length)),
        ("learning_rate", f"{training.learning_rate:g}"),
        ("per_device_train_batch_size", str(training.per_device_train_batch_size)),
        ("seed", str(training.seed)),
    ]
    if training.max_steps > 0:
        rows.insert(5, ("max steps per round", str(training.max_steps)))
    return rows


def _rows(rounds: list[dict]) -> list[dict]:
    return [
        {
            "round": r.get("round", i),
            "train_loss": _fmt(r.get("train", {}).get("train_loss")),
            "fed_loss": _fmt(r.get("evaluate", {}).get("eval_loss")),
            "fed_accuracy": _fmt(r.get("evaluate", {}).get("eval_accuracy")),
            "central_loss": _fmt(r.get("central", {}).get("eval_loss")),
            "central_accuracy": _fmt(r.get("central", {}).get("eval_accuracy")),
            "central_f1": _fmt(r.get("central", {}).get("eval_f1")),
            "fed_exact_match": _fmt(r.get("evaluate", {}).get("eval_exact_match")),
            "central_perplexity": _fmt(r.get("central", {}).get("eval_perplexity")),
            "central_exact_match": _fmt(r.get("central", {}).get("eval_exact_match")),
            "central_label_accuracy": _fmt(r.get("central", {}).get("eval_label_accuracy")),
        }
        for i, r in enumerate(rounds)
    ]


def render_card(run_args: RunArguments, task: Task, facts: RunFacts, rounds: list[dict]) -> ModelCard:
    """The card of the last round in `rounds` (the metrics dicts of rounds 0..N, in order)."""
    round_num = rounds[-1]["round"]
    central = rounds[-1].get("central", {})
    model_id = run_args.hub.hub_model_id or Path(run_args.training.output_dir).name
    dataset_id = _dataset_id(run_args)
    dataset_type = dataset_id or Path(run_args.data.dataset).name
    eval_results = [
        EvalResult(
            task_type=task.pipeline_tag,
            dataset_type=dataset_type,
            dataset_name=f"{dataset_type} (central test split)",
            dataset_split=run_args.data.test_split,
            metric_type=metric,
            metric_value=central[f"eval_{metric}"],
        )
        for metric in task.card_metrics
        if isinstance(central.get(f"eval_{metric}"), (int, float))
    ]
    base_model = _hub_id(run_args.model.model_name_or_path)
    adapter = run_args.peft.peft != "none"
    card_data = ModelCardData(
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        # Adapter rounds load with peft (the Hub shows peft's snippet); full rounds with transformers.
        library_name="peft" if adapter else "transformers",
        pipeline_tag=task.pipeline_tag,
        license=run_args.hub.hub_license,
        tags=[*TAGS, task.pipeline_tag],
        model_name=model_id,
        eval_results=eval_results or None,
    )
    base_model_text = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A model"
    if run_args.model.model_name_or_path == OFFLINE_MODEL:
        base_model_text = f"[{OFFLINE_MODEL}](https://huggingface.co/{OFFLINE_MODEL})"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES_DIR / task.card_template),
        model_id=model_id,
        base_model=base_model or run_args.model.model_name_or_path,
        adapter=adapter,
        base_model_text=base_model_text,
        **task.card_fields(run_args, facts),
        num_clients=run_args.federation.num_clients,
        strategy=run_args.federation.strategy,
        round_num=round_num,
        num_rounds=run_args.federation.num_rounds,
        central_accuracy=central.get("eval_accuracy"),
        setup=_setup(run_args),
        rows=_rows(rounds),
        plot_file=checkpoint.PLOT_FILE,
    )


def plot_rounds(
    rounds: list[dict], path: str | os.PathLike, title: str = "", scores: tuple[str, ...] = ("eval_accuracy",)
) -> Path:
    """Draw the task's `scores` (e.g. accuracy) and the loss per round (central and federated
    evaluation, training loss) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(group: str, key: str) -> tuple[list, list]:
        points = [(r["round"], r.get(group, {}).get(key)) for r in rounds]
        points = [(x, y) for x, y in points if isinstance(y, (int, float))]
        return [x for x, _ in points], [y for _, y in points]

    figure, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    score_name = ", ".join(score.removeprefix("eval_").replace("_", " ") for score in scores)
    for group, label in (("central", "central test"), ("evaluate", "clients' eval")):
        for score in scores:
            name = f"{label}, {score.removeprefix('eval_')}" if len(scores) > 1 else label
            score_ax.plot(*series(group, score), marker="o", label=name)
        loss_ax.plot(*series(group, "eval_loss"), marker="o", label=label)
    loss_ax.plot(*series("train", "train_loss"), marker="o", label="clients' training")
    for ax, name in ((score_ax, score_name), (loss_ax, "loss")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_card(
    folder: str | os.PathLike, run_args: RunArguments, task: Task, facts: RunFacts, rounds: list[dict]
):
    """Write README.md and metrics.png of the last round in `rounds` into `folder`."""
    folder = Path(folder)
    title = (
        f"{run_args.hub.hub_model_id or Path(run_args.training.output_dir).name}, round {rounds[-1]['round']}"
    )
    plot_rounds(rounds, folder / checkpoint.PLOT_FILE, title=title, scores=task.plotted_scores)
    render_card(run_args, task, facts, rounds).save(folder / checkpoint.CARD_FILE)
