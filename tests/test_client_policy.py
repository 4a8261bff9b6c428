"""The client's own policy: the run config a server sends is untrusted and checked when it is read."""

import json
import time
from pathlib import Path

import pytest
from conftest import REVIEW_LABELS
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from transformers import HfArgumentParser

from hf_flower.arguments import parse_args
from hf_flower.arguments.policy import (
    ALLOWED_DATA_ENV,
    ALLOWED_MODELS_ENV,
    COLUMNS_ENV,
    OPERATORS_RUN_ENV,
    SERVER_SETTABLE_TRAINING_FIELDS,
    TRUST_REMOTE_CODE_ENV,
    USE_HUB_TOKEN_ENV,
    ClientPolicy,
    RunRefused,
)
from hf_flower.arguments.run_config import RUN_CONFIG_TRAINING_FIELDS, from_run_config, to_run_config
from hf_flower.client import client_app
from hf_flower.commands.client import ClientArguments

ROOT = Path(__file__).resolve().parents[1]
NO_POLICY = ClientPolicy()


def run_config(*flags: str, extra: dict | None = None, **keys) -> dict:
    """The run config a server would send for `flags`, with `training.extra` and keys replaced."""
    config = to_run_config(parse_args(["--output_dir", "out", *flags]))
    if extra is not None:
        config["training.extra"] = json.dumps(extra)
    config.update(keys)
    return config


def test_remote_code_is_refused_unless_the_clients_own_flag_allows_it():
    config = run_config("--trust_remote_code")
    with pytest.raises(RunRefused, match=r"model.trust-remote-code=true .* started with --trust_remote_code"):
        from_run_config(config, policy=NO_POLICY.check)
    allowed = from_run_config(config, policy=ClientPolicy(trust_remote_code=True).check)
    assert allowed.model.trust_remote_code is True
    # The server reads its own run config without a client policy.
    assert from_run_config(config).model.trust_remote_code is True


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"hub_token": "hf_secret"}, "'hub_token' is refused: clients never push to the Hub, and tokens"),
        ({"push_to_hub": True}, "'push_to_hub' is refused: clients never push to the Hub"),
        ({"trackio_space_id": "eve/space"}, "'trackio_space_id' is refused: clients never push to the Hub"),
        (
            {"dataloader_num_workers": 512},
            r"'dataloader_num_workers' is refused: 512 workers exceed .* cores",
        ),
        (
            {"enable_jit_checkpoint": True},
            "'enable_jit_checkpoint' is refused: it writes files on the client",
        ),
        (
            {"resume_from_checkpoint": "/ckpt"},
            "'resume_from_checkpoint' is refused: it resumes from a checkpoint",
        ),
        ({"deepspeed": "/etc/ds.json"}, "'deepspeed' is refused: how the client's processes and devices"),
        ({"fsdp_config": "/etc/fsdp.json"}, "'fsdp_config' is refused: how the client's processes"),
        ({"debug": "underflow_overflow"}, "'debug' is refused: it is not one of the training settings"),
    ],
)
def test_training_settings_outside_the_allowlist_are_refused(extra, reason):
    with pytest.raises(RunRefused, match=rf"This client refuses the run config: training setting {reason}"):
        from_run_config(run_config(extra=extra), policy=NO_POLICY.check)


def test_every_refusal_is_named_in_one_message():
    config = run_config("--trust_remote_code", extra={"hub_token": "hf_x", "deepspeed": "ds.json"})
    with pytest.raises(RunRefused) as refused:
        from_run_config(config, policy=ClientPolicy(trust_remote_code=True).check)
    message = str(refused.value)
    assert "'deepspeed'" in message and "'hub_token'" in message
    assert "hf_x" not in message  # names the key, never echoes a token


def test_allowed_training_settings_reach_the_trainer():
    extra = {
        "adam_beta2": 0.98, "label_smoothing_factor": 0.1, "activation_checkpointing": True,
        "optim": "adamw_torch", "use_cpu": True, "dataloader_pin_memory": False, "dataloader_num_workers": 1,
    }  # fmt: skip
    run_args = from_run_config(
        run_config("--learning_rate", "3e-4", "--max_steps", "7", extra=extra), policy=NO_POLICY.check
    )
    assert run_args.training.learning_rate == 3e-4 and run_args.training.max_steps == 7
    assert run_args.training.adam_beta2 == 0.98 and run_args.training.activation_checkpointing is True


def test_our_own_run_configs_pass_every_client():
    """What the launchers send (the dedicated `training.*` keys and the shipped configs) is allowed."""
    assert set(RUN_CONFIG_TRAINING_FIELDS) <= SERVER_SETTABLE_TRAINING_FIELDS
    for config_file in sorted((ROOT / "configs").glob("*.yaml")):
        config = to_run_config(parse_args(["--config", str(config_file)]))
        from_run_config(config, policy=NO_POLICY.check)


def test_allowed_models_pins_the_model_its_revision_and_tokenizer(tmp_path):
    policy = ClientPolicy.from_flags(False, "org/a, org/b@v1.0," + str(tmp_path / "local"))
    assert policy.allowed_models == ("org/a", "org/b@v1.0", str(tmp_path / "local"))
    from_run_config(run_config("--model_name_or_path", "org/a", "--revision", "dev"), policy=policy.check)
    from_run_config(run_config("--model_name_or_path", "org/b", "--revision", "v1.0"), policy=policy.check)
    (tmp_path / "local").mkdir()
    same_folder = f"{tmp_path}/./local/"
    from_run_config(run_config("--model_name_or_path", same_folder), policy=policy.check)
    for flags, refused in [
        (["--model_name_or_path", "eve/model"], r"model 'eve/model' \(revision 'main'\) is not in"),
        (["--model_name_or_path", "org/b"], r"model 'org/b' \(revision 'main'\)"),
        (["--model_name_or_path", "org/a", "--tokenizer_name_or_path", "eve/tok"], "model 'eve/tok'"),
    ]:
        with pytest.raises(RunRefused, match=rf"{refused}.*--allowed_models \['org/a', 'org/b@v1.0'"):
            from_run_config(run_config(*flags), policy=policy.check)


@pytest.mark.parametrize("allowed", ["org/a,,org/b", "org/a@", "@v1", ""])
def test_malformed_allowed_models_are_refused(allowed):
    with pytest.raises(ValueError, match="--allowed_models"):
        ClientPolicy.from_flags(False, allowed)


def test_client_flags_reach_the_clientapp_through_the_environment():
    argv = [
        "--superlink", "127.0.0.1:9092", "--trust_remote_code", "--allowed_models", "org/a@v1",
        "--allowed_data", "org/data,/data/x.csv", "--label_column", "sentiment", "--use_hub_token",
    ]  # fmt: skip
    (args,) = HfArgumentParser(ClientArguments).parse_args_into_dataclasses(argv)
    policy = args.policy()
    assert policy == ClientPolicy(
        trust_remote_code=True,
        allowed_models=("org/a@v1",),
        allowed_data=("org/data", "/data/x.csv"),
        columns=(("label_column", "sentiment"),),
        use_hub_token=True,
    )
    assert ClientPolicy.from_env(policy.to_env()) == policy
    # A client started without the flags resets what its shell may have exported.
    assert ClientPolicy().to_env() == {
        TRUST_REMOTE_CODE_ENV: "0",
        ALLOWED_MODELS_ENV: "",
        ALLOWED_DATA_ENV: "",
        COLUMNS_ENV: "{}",
        USE_HUB_TOKEN_ENV: "0",
        OPERATORS_RUN_ENV: "0",
    }
    assert ClientPolicy.from_env({}) == NO_POLICY
    with pytest.raises(ValueError, match="--text_column is empty"):
        ClientPolicy.from_flags(columns={"text_column": " "})


def test_in_simulation_the_operators_own_flag_counts():
    assert ClientPolicy.of_operator(run_config("--trust_remote_code")).trust_remote_code is True
    assert ClientPolicy.of_operator(run_config()).trust_remote_code is False
    # Its run config is the operator's own: its clients import the Trainer factory it names, and
    # load the local model and data set it names.
    operator = ClientPolicy.of_operator(run_config())
    assert operator.operators_run is True and ClientPolicy.from_env({}).operators_run is False
    local = run_config("--model_name_or_path", "/models/bert", "--dataset", "/data/reviews.csv")
    run_args = operator.restrict(from_run_config(local, policy=operator.check), lambda data: {}, True)
    assert run_args.data.dataset == "/data/reviews.csv"


def test_a_refused_run_is_this_clients_failure_reply_not_a_crash(monkeypatch, caplog):
    for name, value in NO_POLICY.to_env().items():
        monkeypatch.setenv(name, value)
    config = run_config("--trust_remote_code", extra={"push_to_hub": True})
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
        run_config=config,
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord(),
            "config": ConfigRecord({"server-round": 1, "label-names": list(REVIEW_LABELS)}),
        }
    )
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN,
    )  # fmt: skip
    reply = client_app.app(message=Message(metadata=metadata, content=content), context=context)
    assert reply.has_error()
    assert "failed during training of round 1: refused-by-policy" in reply.error.reason
    assert "push_to_hub" not in reply.error.reason  # what was refused is in the client's own log
    assert "This client refuses the run config" in caplog.text
    assert "--trust_remote_code" in caplog.text and "'push_to_hub'" in caplog.text


def test_the_server_refuses_at_start_what_every_client_would_refuse(tmp_path, tiny_model_dir, reviews_csv):
    """A setting outside the allowlist in the server's own config fails the pre-flight check,
    before any client is asked; one the client replaces (`save_steps`) passes."""
    from conftest import tiny_run_flags

    from hf_flower.arguments import parse_args
    from hf_flower.server.preflight import check_client_policy

    flags = tiny_run_flags(tmp_path / "run", tiny_model_dir, reviews_csv)
    check_client_policy(parse_args([*flags, "--save_steps", "10"]))
    with pytest.raises(
        ValueError,
        match="Clients do not follow these training settings from a server: "
        "training setting 'debug' is refused",
    ):
        check_client_policy(parse_args([*flags, "--debug", "underflow_overflow"]))


def test_local_models_are_refused_unless_listed_and_hub_models_pass(tmp_path):
    """Issue 22 point 6: a run config may name any Hub model, but no folder of the client's machine
    its operator did not list (a folder listed admits what is under it)."""
    (tmp_path / "models" / "bert").mkdir(parents=True)
    local = str(tmp_path / "models" / "bert")
    for name in (local, "./bert", "../bert", "~/bert", "/etc/passwd", "a/b/c"):
        with pytest.raises(RunRefused, match=r"is a path on this machine; .* lists them in --allowed_models"):
            from_run_config(run_config("--model_name_or_path", name), policy=NO_POLICY.check)
    with pytest.raises(RunRefused, match=f"model '{tmp_path}/tok' is a path"):
        config = run_config(
            "--model_name_or_path", "org/model", "--tokenizer_name_or_path", f"{tmp_path}/tok"
        )
        from_run_config(config, policy=NO_POLICY.check)
    from_run_config(run_config("--model_name_or_path", "org/model"), policy=NO_POLICY.check)
    listed = ClientPolicy.from_flags(allowed_models=str(tmp_path / "models"))
    from_run_config(run_config("--model_name_or_path", local), policy=listed.check)


def test_pull_request_revisions_need_an_entry_that_pins_them():
    """Anyone can open a pull request on the Hub: `refs/pr/N` passes only an entry pinned to it."""
    config = run_config("--model_name_or_path", "org/a", "--revision", "refs/pr/3")
    for policy in (NO_POLICY, ClientPolicy.from_flags(allowed_models="org/a")):
        with pytest.raises(RunRefused, match="refs/pr/3"):
            from_run_config(config, policy=policy.check)
    from_run_config(config, policy=ClientPolicy.from_flags(allowed_models="org/a@refs/pr/3").check)


def classification_columns(data_args):
    from hf_flower.tasks import get_task

    return get_task("text-classification").data_columns(data_args)


def test_a_partition_client_reads_a_local_data_set_only_when_listed(tmp_path):
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "reviews.csv"
    csv.write_text("text,label\na,0\n")
    (tmp_path / "outside.csv").write_text("text,label\nb,1\n")
    (tmp_path / "data" / "link.csv").symlink_to(tmp_path / "outside.csv")

    def restrict(policy, dataset, reads_dataset=True):
        run_args = from_run_config(run_config("--dataset", dataset), policy=policy.check)
        return policy.restrict(run_args, classification_columns, reads_dataset)

    for dataset in (str(csv), "../reviews.csv", "/etc/passwd"):
        with pytest.raises(RunRefused, match="is a path on this machine; .* lists them in --allowed_data"):
            restrict(NO_POLICY, dataset)
    restrict(NO_POLICY, str(csv), reads_dataset=False)  # a --data_path client never reads it
    for dataset in ("offline-imdb", "stanfordnlp/imdb"):
        restrict(NO_POLICY, dataset)
    folder = ClientPolicy.from_flags(allowed_data=str(tmp_path / "data"))
    restrict(folder, str(csv))
    with pytest.raises(RunRefused, match=r"is not in this client's --allowed_data \["):
        restrict(folder, str(tmp_path / "data" / "link.csv"))  # a link out of the folder
    with pytest.raises(RunRefused, match="--allowed_data"):
        restrict(folder, "offline-imdb")  # with the flag, only what it lists


def test_pinned_columns_replace_the_runs_and_no_other_column_is_read():
    """A client's own column names win; a run reading a column setting it did not pin is refused."""
    from hf_flower.tasks import get_task

    policy = ClientPolicy.from_flags(columns={"text_column": "review", "label_column": "sentiment"})
    run_args = policy.restrict(
        from_run_config(run_config("--label_column", "ssn")), classification_columns, False
    )
    assert (run_args.data.text_column, run_args.data.label_column) == ("review", "sentiment")
    with pytest.raises(RunRefused, match="the run reads --text_pair_column, which this client does not pin"):
        policy.restrict(
            from_run_config(run_config("--text_pair_column", "ssn")), classification_columns, False
        )

    sft_columns = get_task("causal-lm").data_columns
    config = run_config("--task", "causal-lm", "--prompt_column", "p", "--completion_column", "c")
    pinned = ClientPolicy.from_flags(columns={"prompt_column": "question", "completion_column": "answer"})
    run_args = pinned.restrict(from_run_config(config), sft_columns, False)
    assert (run_args.data.prompt_column, run_args.data.completion_column) == ("question", "answer")
    with pytest.raises(RunRefused, match="--prompt_column, --completion_column, which this client"):
        ClientPolicy.from_flags(columns={"text_column": "body"}).restrict(
            from_run_config(config), sft_columns, False
        )


def test_a_run_never_makes_a_client_report_to_its_trackers():
    """`report_to` is the server's tracking: a built-in task on a client reports to none."""
    config = run_config("--report_to", "wandb")
    run_args = NO_POLICY.restrict(
        from_run_config(config, policy=NO_POLICY.check), classification_columns, False
    )
    assert run_args.training.report_to == []
    operator = ClientPolicy.of_operator(config)  # in a simulation the clients are the operator's
    assert operator.restrict(from_run_config(config), classification_columns, True).training.report_to == [
        "wandb"
    ]


def test_hub_downloads_a_run_causes_send_no_token(monkeypatch):
    from huggingface_hub.utils import build_hf_headers

    monkeypatch.setenv("HF_TOKEN", "hf_client_secret")
    assert "authorization" in build_hf_headers()
    with NO_POLICY.hub_downloads():
        assert "authorization" not in build_hf_headers()
        assert "authorization" in build_hf_headers(token=True)  # an explicit token still goes
    for allowed in (ClientPolicy(use_hub_token=True), ClientPolicy.of_operator({})):
        with allowed.hub_downloads():
            assert "authorization" in build_hf_headers()
    assert "authorization" in build_hf_headers()
