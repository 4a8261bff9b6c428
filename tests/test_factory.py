"""A user's `make_trainer`: the reference every process imports it by, and what is refused, with the fix,
before any training: factories other processes cannot import, factories that return no Trainer,
Trainer settings hf-flower cannot federate, and (from Python and the command line) before any Flower
process starts."""

import subprocess
import sys
import textwrap

import pytest
from transformers import Trainer, TrainingArguments

import hf_flower
from hf_flower.context import TrainerContext
from hf_flower.factory import FactoryError, build_trainer, check_signature, factory_ref, load_factory

SCRIPT = """
import hf_flower
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

CALLS = []


def make_trainer(context):
    CALLS.append(context.role)
    model = AutoModelForSequenceClassification.from_pretrained({model!r})
    return Trainer(model=model, args=TrainingArguments(output_dir={output!r}, report_to="none"))


if __name__ == "__main__":
    raise SystemExit("the script's main block must not run when hf-flower imports its make_trainer")
"""


@pytest.fixture
def script(tmp_path, tiny_model_dir):
    path = tmp_path / "my_script.py"
    path.write_text(SCRIPT.format(model=str(tiny_model_dir), output=str(tmp_path / "out")))
    return path


def test_a_script_factory_is_imported_by_its_path_without_its_main_block(script, monkeypatch):
    monkeypatch.chdir(script.parent)
    ref = factory_ref("my_script.py:make_trainer")
    assert ref == f"{script}:make_trainer"  # absolute: every process finds it, whatever its folder
    factory = load_factory(ref)
    trainer = build_trainer(factory, TrainerContext(role="server"), ref)
    assert isinstance(trainer, Trainer)
    assert load_factory(ref) is factory  # imported once per process
    assert factory_ref(factory) == ref  # and named back the same way
    check_signature(factory, ref)


def test_a_module_factory_is_found_in_the_working_folder(script, monkeypatch):
    """`hf-flower simulate --trainer my_script:make_trainer` from the script's folder: the console script
    does not put the working folder on the path, `load_factory` does (as `python -m` would)."""
    monkeypatch.chdir(script.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(script.parent))])
    try:
        factory = load_factory("my_script:make_trainer")
        assert factory_ref(factory) == "my_script:make_trainer"
    finally:
        sys.modules.pop("my_script", None)


def test_a_module_factory_keeps_its_module_name():
    from hf_flower.tasks import text_classification

    assert factory_ref(text_classification.make_trainer) == "hf_flower.tasks.text_classification:make_trainer"


def make_closure():
    def make_trainer(context):
        pass

    return make_trainer


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda context: None, "is a lambda"),
        (make_closure(), "defined inside another function"),
        ("my_script.py", "is not `module:function`"),
        (42, "make_trainer must be a function"),
    ],
)
def test_factories_other_processes_cannot_import_are_refused(factory, message):
    with pytest.raises(FactoryError, match=message):
        factory_ref(factory)


def test_a_function_of_an_interactive_main_is_refused_with_the_fix(tmp_path):
    """`python -c` (or a notebook): a __main__ without a file, which no simulation worker can import."""
    code = textwrap.dedent(
        """
        import hf_flower
        def make_trainer(context):
            pass
        try:
            hf_flower.simulate(make_trainer, output_dir="unused")
        except hf_flower.FactoryError as err:
            print(err)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert "belongs to a __main__ without a file" in done.stdout, done.stdout + done.stderr
    assert "put it in a .py file" in done.stdout
    assert not (tmp_path / "unused").exists()  # nothing was started or written


def test_unknown_modules_and_names_are_named(tmp_path, script):
    with pytest.raises(FactoryError, match="Cannot import module 'no_such_module'"):
        load_factory("no_such_module:make_trainer")
    with pytest.raises(FactoryError, match="does not exist"):
        load_factory(f"{tmp_path / 'missing.py'}:make_trainer")
    with pytest.raises(FactoryError, match="defines no 'build'"):
        load_factory(f"{script}:build")
    with pytest.raises(FactoryError, match="exactly one parameter"):
        check_signature(lambda: None, "f")


@pytest.mark.parametrize(
    "returned, message",
    [
        (None, "returned None \\(no return statement\\?\\)"),
        ("trainer", "returned a str, not a transformers.Trainer"),
    ],
)
def test_a_factory_that_returns_no_trainer_is_refused(returned, message):
    with pytest.raises(FactoryError, match=message):
        build_trainer(lambda context: returned, TrainerContext(role="client"))


@pytest.mark.parametrize(
    "args, message",
    [
        ({"fsdp": "full_shard"}, "DeepSpeed ZeRO and FSDP shard across ranks"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "DeepSpeed ZeRO and FSDP shard across ranks"),
    ],
)
def test_sharded_training_settings_are_refused(tmp_path, tiny_model_dir, args, message, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    training = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    for name, value in args.items():  # as a user's TrainingArguments would carry them on a GPU machine
        monkeypatch.setattr(training, name, value, raising=False)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    trainer.args = training
    with pytest.raises(FactoryError, match=message):
        build_trainer(lambda context: trainer, TrainerContext(role="client"))


def test_model_init_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    def model_init():
        return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)

    trainer = Trainer(
        model_init=model_init, args=TrainingArguments(output_dir=str(tmp_path), report_to="none")
    )
    with pytest.raises(FactoryError, match="model_init"):
        build_trainer(lambda context: trainer, TrainerContext(role="server"))


def test_the_script_command_line_refuses_a_factory_that_returns_no_trainer_before_flower_starts(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text(
        "import hf_flower\ndef make_trainer(context):\n    return None\nhf_flower.main(make_trainer)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), "train"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode != 0 and "returned None" in done.stderr, done.stderr[-2000:]


def test_the_public_api():
    assert set(hf_flower.__all__) == {
        "FactoryError", "FederationArguments", "HubArguments", "TrainerContext", "__version__", "main", "simulate",
    }  # fmt: skip
    for name in hf_flower.__all__:
        assert getattr(hf_flower, name) is not None


def test_importing_the_package_imports_no_torch():
    code = "import sys, hf_flower; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_round": 2}, "unknown settings \\['num_round'\\]"),
        ({"trainer": "x:y"}, "unknown settings \\['trainer'\\]"),
    ],
)
def test_simulate_names_unknown_settings(settings, message, script):
    with pytest.raises(TypeError, match=message):
        hf_flower.simulate(load_factory(f"{script}:make_trainer"), **settings)
