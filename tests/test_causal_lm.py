"""`--task causal-lm`: the ClientApp's SFT round in-process, the task's refusals, and a real simulation
whose rounds load as PEFT adapters and, merged, with `AutoModelForCausalLM` and `pipeline`."""

import json
import time

import pytest
from conftest import run_config_of, sft_flags, trainer_for
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM
from resume_checks import assert_resumed_like, interrupted_after
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_flower import checkpoint
from hf_flower.client import client_app
from hf_flower.factory import model_facts
from hf_flower.launch.plan import RunPlan, run_prepare
from hf_flower.launch.simulation import prepare_simulation, run_simulation
from hf_flower.weights import get_weights


def message(arrays, kind, server_round=1, facts=None):
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({"server-round": server_round, **(facts or {})})}
    )
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
        group_id=str(server_round), created_at=time.time(), ttl=3600, message_type=kind,
    )  # fmt: skip
    return Message(metadata=metadata, content=content)


def test_client_trains_lora_and_scores_generated_answers(tmp_path, tiny_chat_model_dir, chat_jsonl):
    run_config = run_config_of(sft_flags(tmp_path, tiny_chat_model_dir, chat_jsonl, "--max_steps", "6"))
    assert run_config["adapter.peft"] == "lora"  # --peft auto: LoRA for language models
    node = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
        run_config=run_config,
    )  # fmt: skip
    server = trainer_for(run_config)
    start = get_weights(server.model)
    assert all(".lora_" in name for name in start)  # only the adapters travel

    trained = client_app.train(message(start, MessageType.TRAIN, facts=model_facts(server.model)), node)
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    assert trained.content["metrics"]["train_steps"] == 2  # --max_steps 6 over 3 rounds
    assert trained.content["metrics"]["num-examples"] == 20 - 4  # (48 - 8 test rows) / 2, less its eval split

    evaluated = client_app.evaluate(message(trained.content["arrays"], MessageType.EVALUATE), node)
    metrics = evaluated.content["metrics"]
    assert set(metrics) == {
        "eval_loss", "eval_perplexity", "eval_exact_match", "eval_label_accuracy", "eval_runtime", "num-examples"
    }  # fmt: skip
    assert 0 <= metrics["eval_exact_match"] <= metrics["eval_label_accuracy"] <= 1
    assert metrics["num-examples"] == 4


@pytest.mark.parametrize(
    "flags, message_part",
    [
        (["--text_pair_column", "x"], "--text_pair_column is a text-classification setting"),
        (["--partitioner", "dirichlet"], "causal-lm examples have none"),
        (["--completion_column", ""], "completion"),
        (["--load_in_4bit", "--peft", "none"], "Use --peft lora (or auto), not --peft none"),
        (["--load_in_4bit"], "needs a CUDA GPU, and this machine has none. Drop --load_in_4bit"),
        (["--max_generate_samples", "-1"], "--max_generate_samples must be 0 (no generation) or more"),
    ],
)
def test_settings_of_the_other_task_are_refused(
    tmp_path, tiny_chat_model_dir, chat_jsonl, flags, message_part
):
    prepared = run_prepare(prepare_simulation, sft_flags(tmp_path, tiny_chat_model_dir, chat_jsonl, *flags))
    assert prepared.plan is None and prepared.exit_code == 2
    assert message_part in prepared.error, prepared.error


def test_encoder_model_and_classification_flags_are_refused(
    tmp_path, tiny_model_dir, reviews_csv, chat_jsonl
):
    encoder = sft_flags(tmp_path, tiny_model_dir, chat_jsonl)
    prepared = run_prepare(prepare_simulation, encoder)
    assert "is not a causal language model" in prepared.error, prepared.error
    classification = [
        "--model_name_or_path", str(tiny_model_dir), "--dataset", str(reviews_csv), "--test_size", "40",
        "--prompt_column", "text", "--output_dir", str(tmp_path / "run2"),
    ]  # fmt: skip
    prepared = run_prepare(prepare_simulation, classification)
    assert "--prompt_column is a causal-lm setting" in prepared.error, prepared.error
    quantized = [*classification[:-4], "--load_in_4bit", *classification[-2:]]
    prepared = run_prepare(prepare_simulation, quantized)
    assert "--load_in_4bit (QLoRA) is a causal-lm setting" in prepared.error, prepared.error


def test_messages_need_a_chat_template(tmp_path, tiny_chat_model_dir):
    plain = tmp_path / "plain-tokenizer-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    tokenizer.chat_template = None
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 12
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [
        "--task", "causal-lm", "--model_name_or_path", str(plain), "--dataset", str(data),
        "--messages_column", "messages", "--test_size", "2", "--client_eval_size", "1",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    prepared = run_prepare(prepare_simulation, flags)
    assert "has no chat template" in prepared.error, prepared.error


def sft_run_flags(tmp_path, model_dir, data, *flags):
    """A 2-round simulated SFT run with FedAdam, whose state a resume must carry over."""
    return sft_flags(
        tmp_path, model_dir, data, "--num_clients", "2", "--num_rounds", "2", "--local_epochs", "2",
        "--strategy", "FedAdam", "--strategy_kwargs", '{"eta": 0.01, "eta_l": 0.01}', *flags,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_chat_model_dir, chat_jsonl):
    """The output folder of an uninterrupted simulated SFT run (`sft_run_flags`, merged rounds)."""
    tmp_path = tmp_path_factory.mktemp("sft-run")
    flags = sft_run_flags(tmp_path, tiny_chat_model_dir, chat_jsonl, "--save_merged")
    assert run_simulation(RunPlan.from_run_config(run_config_of(flags))) == 0
    return tmp_path / "run"


@pytest.mark.slow
def test_simulated_sft_rounds_load_for_generation(sft_run):
    history = checkpoint.read_history(sft_run)
    assert history["status"] == "completed" and [r["round"] for r in history["rounds"]] == [0, 1, 2]
    for record in history["rounds"]:
        assert {"eval_loss", "eval_perplexity", "eval_exact_match", "eval_label_accuracy"} <= set(
            record["central"]
        )
    for record in history["rounds"][1:]:
        assert record["clients"]["train_succeeded"] == 2
        assert "eval_exact_match" in record["evaluate"]
    last = sft_run / "round-2"
    assert ModelCard.load(last / "README.md").data.pipeline_tag == "text-generation"
    adapter = AutoPeftModelForCausalLM.from_pretrained(last)
    tokenizer = AutoTokenizer.from_pretrained(last)
    assert tokenizer.chat_template  # saved with the round
    merged = AutoModelForCausalLM.from_pretrained(last / "merged")
    prompt = [{"role": "user", "content": "the movie was really good . sentiment ? answer with one word ."}]
    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    merged_next = merged(ids).logits[0, -1].argmax()
    assert merged_next == adapter(ids).logits[0, -1].argmax()  # merging changes nothing
    generator = pipeline("text-generation", model=str(last / "merged"))
    assert isinstance(generator(prompt, max_new_tokens=2)[0]["generated_text"], list)


@pytest.mark.slow
def test_resumed_sft_run_matches_the_uninterrupted_run(
    sft_run, tmp_path, tiny_chat_model_dir, chat_jsonl, no_leftover_processes
):
    interrupted_after(sft_run, tmp_path / "run", 1)
    flags = sft_run_flags(tmp_path, tiny_chat_model_dir, chat_jsonl, "--save_merged", "--resume")
    assert run_simulation(RunPlan.from_run_config(run_config_of(flags))) == 0
    assert_resumed_like(tmp_path / "run", sft_run, 1)
