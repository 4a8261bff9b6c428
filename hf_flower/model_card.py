"""Model cards and per-round plots: every round folder gets a README.md and a metrics.png.

The card is rendered with `huggingface_hub.ModelCard.from_template` from the packaged template
`hf_flower/templates/model_card.md` (Jinja): metadata the Hub indexes (`base_model`, `datasets`,
`license`, tags, `pipeline_tag`, `model-index` with the central evaluation's results), the federated
setup, a table of metrics per round, the plot, and how to load the model and a given round
(`revision="round-N"`). What it says of the model comes from the model itself (`CardFacts.of`: its
class gives the pipeline tag and the Auto class that loads it), so it fits any Trainer's model. The
plot is drawn with matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import checkpoint
from .constants import LABEL_NAMES_KEY
from .factory import model_facts
from .hub import hub_id

# Package data (pyproject `[tool.setuptools.package-data]`): beside this module in a checkout, an
# installed wheel and the Flower app folder the launchers write (`launch/app.py`).
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
CARD_TEMPLATE = "model_card.md"
TAGS = ["federated-learning", "flower", "hf-flower"]
# Model classes by what they do: (transformers' mapping of model types to class names, the Hub's
# pipeline tag, the Auto class that loads such a round, peft's, when it has one).
MODEL_KINDS = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification", "AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification", "AutoModelForTokenClassification", "AutoPeftModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering", "AutoModelForQuestionAnswering", "AutoPeftModelForQuestionAnswering"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation", "AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation", "AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification", "AutoModelForImageClassification", None),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", "audio-classification", "AutoModelForAudioClassification", None),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "automatic-speech-recognition", "AutoModelForSpeechSeq2Seq", None),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", None, "AutoModelForMultipleChoice", None),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask", "AutoModelForMaskedLM", None),
)  # fmt: skip
# Metrics that say how long, not how well: never in the card's results or table.
TIMING_SUFFIXES = ("_runtime", "_per_second", "_model_preparation_time")
# The most central metrics the table and the Hub's results show beside the loss.
MAX_CARD_METRICS = 6
# Labels a config invents when it was given none: no information for the card.
DEFAULT_LABELS = ["LABEL_0", "LABEL_1"]


@dataclasses.dataclass(frozen=True)
class CardFacts:
    """What a card says of the run beside its rounds: the model, its kind, the setup."""

    model_id: str
    base_model: str | None
    pipeline_tag: str | None
    auto_class: str
    adapter: bool
    labels: list[str] | None
    processor_class: str | None
    best_metric: str
    setup: list[tuple[str, str]]
    num_clients: int
    num_rounds: int
    strategy: str
    license: str | None = None
    datasets: list[str] | None = None
    merged: bool = False

    @classmethod
    def of(cls, trainer, federation, hub) -> CardFacts:
        """The facts of a run's cards, from the server's `trainer` (its model, processing class and
        `TrainingArguments`), `federation` (`FederationArguments`) and `hub` (`HubArguments`)."""
        model = trainer.model
        adapter = hasattr(model, "peft_config")
        base = model.get_base_model() if adapter else model
        pipeline_tag, auto_class, peft_class = _kind_of(type(base).__name__)
        processor = trainer.processing_class
        args = trainer.args
        return cls(
            model_id=hub.hub_model_id or Path(federation.output_dir).name,
            base_model=_base_model(model, adapter),
            pipeline_tag=pipeline_tag,
            auto_class=(peft_class or "AutoPeftModel") if adapter else auto_class,
            adapter=adapter,
            labels=_labels(base),
            processor_class=_processor_class(processor),
            best_metric=_metric_name(args.metric_for_best_model or "loss"),
            setup=_setup(federation, hub, args),
            num_clients=federation.num_clients,
            num_rounds=federation.num_rounds,
            strategy=federation.strategy,
            license=hub.hub_license,
            datasets=[hub.hub_dataset] if hub.hub_dataset else None,
            merged=adapter and federation.save_merged,
        )


def _kind_of(class_name: str) -> tuple[str | None, str, str | None]:
    """(pipeline tag, Auto class, AutoPeft class) of a model class, by transformers' own mappings."""
    from transformers.models.auto import modeling_auto

    for mapping, tag, auto_class, peft_class in MODEL_KINDS:
        if class_name in getattr(modeling_auto, mapping, {}).values():
            return tag, auto_class, peft_class
    return None, "AutoModel", None


def _base_model(model, adapter: bool) -> str | None:
    """The model fine-tuned, as a Hub id where it has one (the Hub links only ids)."""
    name = model.peft_config["default"].base_model_name_or_path if adapter else None
    return hub_id(name or getattr(getattr(model, "config", None), "_name_or_path", None))


def _labels(model) -> list[str] | None:
    labels = model_facts(model).get(LABEL_NAMES_KEY)
    return labels if labels and labels != DEFAULT_LABELS else None


def _processor_class(processor) -> str | None:
    """The Auto class that loads the round's processing class (tokenizer, image processor, ...)."""
    if processor is None:
        return None
    name = type(processor).__name__
    for kind, auto in (("ImageProcessor", "AutoImageProcessor"), ("FeatureExtractor", "AutoFeatureExtractor"),
                       ("Processor", "AutoProcessor"), ("Tokenizer", "AutoTokenizer")):  # fmt: skip
        if kind in name:
            return auto
    return "AutoTokenizer"


def _metric_name(name: str) -> str:
    return name if name.startswith("eval_") else f"eval_{name}"


def _setup(federation, hub, args) -> list[tuple[str, str]]:
    per_round = max(federation.min_train_clients, round(federation.fraction_train * federation.num_clients))
    strategy = federation.strategy
    if federation.strategy_kwargs:
        strategy += f" `{json.dumps(federation.strategy_kwargs, sort_keys=True)}`"
    if args.max_steps > 0:
        training = ("max_steps (whole training)", str(args.max_steps))
    else:
        training = ("local epochs per round", f"{federation.epochs_per_round(args.num_train_epochs):g}")
    return [
        ("strategy", strategy),
        *([("data set", hub.hub_dataset)] if hub.hub_dataset else []),
        ("clients", str(federation.num_clients)),
        ("clients per round", f"{per_round} (fraction_train={federation.fraction_train})"),
        ("rounds", str(federation.num_rounds)),
        training,
        ("learning_rate", f"{args.learning_rate:g}"),
        ("lr_scheduler_type", f"{getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}"),
        ("per_device_train_batch_size", str(args.per_device_train_batch_size)),
        ("seed", str(args.seed)),
    ]


def card_metrics(central: dict, best_metric: str, limit: int | None = MAX_CARD_METRICS) -> list[str]:
    """The central metrics a card reports: the best-round metric first, then the others that say how
    well (no loss, no timings), at most `limit` (the table's columns; None: all of them)."""
    names = [
        name
        for name, value in central.items()
        if name.startswith("eval_")
        and name != "eval_loss"
        and not name.endswith(TIMING_SUFFIXES)
        and isinstance(value, (int, float))
    ]
    names.sort(key=lambda name: name != best_metric)
    return names[:limit]


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _table(rounds: list[dict], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """The columns and rows of the per-round table."""
    columns = [("train", "train_loss"), ("evaluate", "eval_loss"), ("central", "eval_loss")]
    columns += [("central", name) for name in metrics]
    if metrics:
        columns.insert(2, ("evaluate", metrics[0]))
    names = {"train": "", "evaluate": "fed_", "central": "central_"}
    header = [f"{names[group]}{name}" for group, name in columns]
    rows = [
        [str(r.get("round", i))] + [_fmt(r.get(group, {}).get(name)) for group, name in columns]
        for i, r in enumerate(rounds)
    ]
    return header, rows


def render_card(facts: CardFacts, rounds: list[dict]) -> ModelCard:
    """The card of the last round in `rounds` (the records of rounds 0..N, in order)."""
    central = rounds[-1].get("central", {})
    metrics = card_metrics(central, facts.best_metric)
    every_metric = card_metrics(central, facts.best_metric, limit=None)
    eval_results = [
        EvalResult(
            task_type=facts.pipeline_tag or "other",
            dataset_type=(facts.datasets or [facts.model_id])[0],
            dataset_name="central evaluation data",
            metric_type=name.removeprefix("eval_"),
            metric_value=central[name],
        )
        for name in every_metric
    ]
    card_data = ModelCardData(
        base_model=facts.base_model,
        datasets=facts.datasets,
        # Adapter rounds load with peft (the Hub shows peft's snippet); full rounds with transformers.
        library_name="peft" if facts.adapter else "transformers",
        pipeline_tag=facts.pipeline_tag,
        license=facts.license,
        tags=[*TAGS, *([facts.pipeline_tag] if facts.pipeline_tag else [])],
        model_name=facts.model_id,
        eval_results=eval_results or None,
    )
    headline_name = metrics[0] if metrics else "eval_loss"
    headline = central.get(headline_name)
    columns, rows = _table(rounds, metrics)
    base = facts.base_model
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATES_DIR / CARD_TEMPLATE),
        model_id=facts.model_id,
        base_model=base or "the base model",
        base_model_text=f"[{base}](https://huggingface.co/{base})" if base else "A model",
        pipeline_tag=facts.pipeline_tag,
        labels=facts.labels,
        adapter=facts.adapter,
        auto_class=facts.auto_class,
        processor_class=facts.processor_class,
        processor_name="tokenizer" if facts.processor_class == "AutoTokenizer" else "processor",
        merged=facts.merged,
        merged_class=facts.auto_class.replace("AutoPeftModel", "AutoModel"),
        num_clients=facts.num_clients,
        strategy=facts.strategy,
        round_num=rounds[-1]["round"],
        num_rounds=facts.num_rounds,
        headline={"name": headline_name.removeprefix("eval_").replace("_", " "), "value": headline}
        if isinstance(headline, (int, float))
        else None,
        setup=facts.setup,
        central=[
            (name.removeprefix("eval_"), _fmt(central[name]))
            for name in ["eval_loss", *every_metric]
            if name in central
        ],
        columns=columns,
        rows=rows,
        plot_file=checkpoint.PLOT_FILE,
    )


def plot_rounds(rounds: list[dict], path: str | os.PathLike, title: str = "", scores: list[str] = ()) -> Path:
    """Draw `scores` (central metrics, e.g. accuracy) and the loss per round (central and federated
    evaluation, training loss) as a PNG; without scores, the loss alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(group: str, key: str) -> tuple[list, list]:
        points = [(r["round"], r.get(group, {}).get(key)) for r in rounds]
        points = [(x, y) for x, y in points if isinstance(y, (int, float))]
        return [x for x, _ in points], [y for _, y in points]

    scores = list(scores)[:3]
    figure, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 5.5, 3.8))
    axes = list(axes) if scores else [axes]
    loss_ax = axes[-1]
    if scores:
        score_ax = axes[0]
        for group, label in (("central", "central"), ("evaluate", "clients' eval")):
            for score in scores:
                name = f"{label}, {score.removeprefix('eval_')}" if len(scores) > 1 else label
                score_ax.plot(*series(group, score), marker="o", label=name)
        score_name = ", ".join(score.removeprefix("eval_").replace("_", " ") for score in scores)
        _decorate(score_ax, score_name)
    for group, label in (("central", "central"), ("evaluate", "clients' eval")):
        loss_ax.plot(*series(group, "eval_loss"), marker="o", label=label)
    loss_ax.plot(*series("train", "train_loss"), marker="o", label="clients' training")
    _decorate(loss_ax, "loss")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _decorate(ax, name: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(name)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.xaxis.get_major_locator().set_params(integer=True)


def write_card(folder: str | os.PathLike, facts: CardFacts, rounds: list[dict]) -> None:
    """Write README.md and metrics.png of the last round in `rounds` into `folder`."""
    folder = Path(folder)
    scores = card_metrics(rounds[-1].get("central", {}), facts.best_metric)
    plot_rounds(
        rounds, folder / checkpoint.PLOT_FILE, f"{facts.model_id}, round {rounds[-1]['round']}", scores
    )
    render_card(facts, rounds).save(folder / checkpoint.CARD_FILE)
