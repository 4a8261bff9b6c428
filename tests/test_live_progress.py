"""Progress inside a round: the clients' and the server's files, and how a launcher shows them."""

import io
import json
import subprocess
import sys
import types

import pytest

from hf_flower.launch.flower import flower_env
from hf_flower.progress import live as live_progress
from hf_flower.progress.live import ReplyBoard, TrainingProgress, read_rounds
from hf_flower.progress.view import ProgressView


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def client_file(directory, node, server_round):
    return json.loads((directory / f"client-{node}-round-{server_round}.json").read_text())


def test_training_progress_is_throttled_but_keeps_the_last_step(tmp_path):
    clock = FakeClock()
    progress = TrainingProgress(tmp_path, node_id=7, partition_id=1, server_round=2, clock=clock)
    progress.begin(max_steps=10)
    assert client_file(tmp_path, 7, 2) | {"time": 0} == {
        "node_id": 7, "partition_id": 1, "round": 2, "step": 0, "max_steps": 10, "loss": None,
        "done": False, "time": 0,
    }  # fmt: skip

    clock.now = 0.1
    progress.update(3, 10, loss=0.9)
    assert client_file(tmp_path, 7, 2)["step"] == 0  # within min_interval: not written
    clock.now = 0.7
    progress.update(4, 10)
    assert (client_file(tmp_path, 7, 2)["step"], client_file(tmp_path, 7, 2)["loss"]) == (4, 0.9)
    clock.now = 0.8
    progress.update(10, 10)  # the last step is always written
    assert client_file(tmp_path, 7, 2)["step"] == 10
    progress.update(10, 10, done=True)
    assert client_file(tmp_path, 7, 2)["done"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["client-7-round-2.json"]  # no temporary left


def test_a_client_keeps_only_its_files_of_this_round_and_the_one_before(tmp_path):
    for server_round in (1, 2, 3):
        TrainingProgress(tmp_path, 7, 0, server_round).begin(5)
    TrainingProgress(tmp_path, 8, 1, 1).begin(5)  # another node's file is not this client's to delete
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["client-7-round-2.json", "client-7-round-3.json", "client-8-round-1.json"]


def test_an_unwritable_folder_never_stops_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    TrainingProgress(blocker / "progress", 1, 0, 1).begin(5)  # logs a warning, raises nothing


def test_callback_reports_steps_and_loss_from_the_main_process_only(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    from hf_flower.progress.callback import LiveProgressCallback, training_progress

    context = types.SimpleNamespace(node_id=11, node_config={"partition-id": 3, "num-partitions": 4})
    monkeypatch.delenv(live_progress.PROGRESS_DIR_ENV, raising=False)
    assert training_progress(context, server_round=2) is None  # no launcher watching: no callback
    monkeypatch.setenv(live_progress.PROGRESS_DIR_ENV, str(tmp_path))
    callback = training_progress(context, server_round=2)
    assert isinstance(callback, LiveProgressCallback)

    state, control = TrainerState(max_steps=4), TrainerControl()
    callback.on_train_begin(None, state, control)
    for step in (1, 2, 3, 4):
        state.global_step = step
        callback.on_step_end(None, state, control)
        if step == 2:
            callback.on_log(None, state, control, logs={"loss": 0.5, "grad_norm": 1.0})
    callback.on_log(None, state, control, logs={"train_loss": 0.6, "train_runtime": 1.0})
    callback.on_train_end(None, state, control)
    record = client_file(tmp_path, 11, 2)
    assert (record["partition_id"], record["step"], record["max_steps"]) == (3, 4, 4)
    assert (record["loss"], record["done"]) == (0.6, True)

    other_rank = TrainerState(max_steps=4, is_world_process_zero=False)
    quiet = LiveProgressCallback(TrainingProgress(tmp_path, 12, 0, 2))
    quiet.on_train_begin(None, other_rank, control)
    quiet.on_train_end(None, other_rank, control)
    assert not (tmp_path / "client-12-round-2.json").exists()


def message(node, partition=None, error=None, metrics=None):
    """The parts of a Flower reply (or instruction) that `ReplyBoard` reads."""
    content = types.SimpleNamespace(
        config_records={"client": {"partition-id": partition}} if partition is not None else {},
        metric_records={"metrics": metrics or {}},
    )
    return types.SimpleNamespace(
        metadata=types.SimpleNamespace(src_node_id=node, dst_node_id=node),
        content=content,
        has_error=lambda: error is not None,
        error=types.SimpleNamespace(reason=error),
    )


def test_reply_board_records_arrivals_rejections_and_silent_nodes(tmp_path):
    board = ReplyBoard(tmp_path)
    board.start(1, "train", [message(n) for n in (1, 2, 3, 4)])
    ok, bad = message(1, 0, metrics={"train_loss": 0.5, "num-examples": 8}), message(2, 1)
    board.reply(ok)
    board.reply(bad)
    board.reply(message(3, error="client partition 2 failed during training of round 1: OSError\ntrace"))
    board.finish(
        [ok],
        [
            "round 1 train: node 2 (partition 1): its update was rejected: NaN in classifier.bias",
            "round 1 train: node 3: client partition 2 failed ...",
            "round 1 train: node 4: no reply within the round timeout",
        ],
    )
    phase = read_rounds(tmp_path)[1].phases["train"]
    assert (phase.sampled, phase.finished, phase.arrived, phase.failed) == (4, True, 3, 3)
    assert [(r.node_id, r.partition_id, r.status) for r in phase.replies] == [
        (1, 0, "ok"), (2, 1, "rejected"), (3, None, "error"), (4, None, "missing"),
    ]  # fmt: skip
    assert phase.replies[0].metrics == {"train_loss": 0.5, "num-examples": 8.0}
    assert "NaN in classifier.bias" in phase.replies[1].error
    assert phase.replies[2].error == "client partition 2 failed during training of round 1: OSError"
    assert phase.replies[3].error == "no reply within the round timeout"

    board.start(1, "evaluate", [message(1)])
    board.start(3, "train", [message(1)])  # round 3 starts: the files of round 1 go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server-round-3.json"]


def test_reply_board_without_a_folder_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(live_progress.PROGRESS_DIR_ENV, raising=False)
    board = ReplyBoard.from_env()
    board.start(1, "train", [message(1)])
    board.reply(message(1))
    board.finish([], [])
    assert board.directory is None


def test_reply_board_never_fails_a_round(tmp_path):
    board = ReplyBoard(tmp_path)
    board.start(1, "train", [object()])  # no metadata: logged, not raised
    board.reply(None)
    board.finish(None, None)


@pytest.mark.parametrize(
    "name, text",
    [
        ("client-1-round-1.json", "{not json"),
        ("client-1-round-1.json", "[1, 2]"),
        ("client-1-round-1.json", '{"node_id": "x", "round": 1}'),
        ("client-1-round-1.json", '{"node_id": 1, "round": -1}'),
        ("client-1-round-1.json", '{"node_id": 1, "round": 1, "step": 1.5}'),
        ("client-1-round-1.json", '{"node_id": 1, "round": 1, "loss": "low"}'),
        ("server-round-1.json", '{"round": 1, "phases": []}'),
        ("server-round-1.json", '{"round": 1, "phases": {"train": {"replies": 3}}}'),
        ("server-round-1.json", '{"phases": {}}'),
        ("server-round-1.json", "[" * 100_000),
        ("server-round-1.json", ""),
        ("client-1-round-1.json", b"\xff\xfe{}"),
    ],
)
def test_malformed_files_are_skipped(tmp_path, name, text):
    (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    assert read_rounds(tmp_path) == {}
    view = ProgressView(tmp_path, 2, stream=io.StringIO())
    view.poll()
    view.close()


def test_bad_reply_entries_do_not_hide_the_good_ones(tmp_path):
    replies = [
        {"node_id": 1, "status": "ok", "partition_id": "x"},  # an odd partition is only not shown
        {"node_id": -1, "status": "ok"}, {"status": "nonsense"}, 5,
    ]  # fmt: skip
    data = {"round": 2, "phases": {"train": {"sampled": [1, 2], "replies": replies}}}
    (tmp_path / "server-round-2.json").write_text(json.dumps(data))
    (tmp_path / "notes.txt").write_text("not ours")
    (reply,) = read_rounds(tmp_path)[2].phases["train"].replies
    assert (reply.node_id, reply.partition_id) == (1, None)
    assert read_rounds(tmp_path / "missing") == {} and read_rounds(None) == {}


def write_round(directory, server_round, steps, replied=(), max_steps=20):
    """Clients at `steps` (node -> step) and the server's train phase with `replied` nodes in."""
    for node, step in steps.items():
        progress = TrainingProgress(directory, node, node - 100, server_round)
        progress.update(step, max_steps, loss=1.0 / step if step else None, force=True)
    board = ReplyBoard(directory, min_interval=0)
    board.start(server_round, "train", [message(node) for node in steps])
    for node in replied:
        board.reply(message(node, node - 100, metrics={"train_loss": 0.25, "train_steps": max_steps}))


def test_plain_output_has_a_line_per_tenth_of_the_steps_and_per_reply(tmp_path):
    clock = FakeClock()
    stream = io.StringIO()
    view = ProgressView(tmp_path, num_rounds=2, stream=stream, clock=clock)
    assert not view.terminal
    for step in range(1, 21):  # the launcher polls once per step here
        clock.now += 1
        write_round(tmp_path, 1, {100: step, 101: min(step, 5)})
        view.poll()
    write_round(tmp_path, 1, {100: 20, 101: 20}, replied=[100, 101])
    view.poll()
    view.write("round 1/2 | clients 2/2 | ...")
    view.poll()  # nothing new: nothing printed again
    view.close()

    lines = stream.getvalue().splitlines()
    client_0 = [line for line in lines if line.startswith("  round 1/2 client 0: step")]
    # The first sighting, then each tenth of the steps.
    assert [line.split(",")[0].split("step ")[1] for line in client_0] == [
        "1/20 (5%)",
        *(f"{step}/20 ({5 * step}%)" for step in range(2, 21, 2)),
    ]
    assert client_0[1] == "  round 1/2 client 0: step 2/20 (10%), loss 0.5000"
    client_1 = [line for line in lines if line.startswith("  round 1/2 client 1: step")]
    assert [line.split(",")[0] for line in client_1] == [
        "  round 1/2 client 1: step 1/20 (5%)", "  round 1/2 client 1: step 2/20 (10%)",
        "  round 1/2 client 1: step 4/20 (20%)", "  round 1/2 client 1: step 20/20 (100%)",
    ]  # fmt: skip
    assert lines[-3:] == [
        "  round 1/2 client 0: replied to train (1/2), train_loss 0.2500, 20 steps",
        "  round 1/2 client 1: replied to train (2/2), train_loss 0.2500, 20 steps",
        "round 1/2 | clients 2/2 | ...",
    ]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_plain_output_of_a_slow_client_every_plain_seconds(tmp_path):
    clock = FakeClock()
    stream = io.StringIO()
    view = ProgressView(tmp_path, num_rounds=1, stream=stream, clock=clock, plain_seconds=30)
    for step in range(1, 8):
        clock.now += 10
        write_round(tmp_path, 1, {100: step}, max_steps=1000)
        view.poll()
    assert [line.split(",")[0].split(": ")[1] for line in stream.getvalue().splitlines()] == [
        "step 1/1000 (0%)", "step 4/1000 (0%)", "step 7/1000 (0%)",
    ]  # fmt: skip


def test_failures_are_lines_named_by_the_partition_their_node_had(tmp_path):
    write_round(tmp_path, 1, {100: 20, 101: 20}, replied=[100, 101])
    board = ReplyBoard(tmp_path)
    board.start(2, "train", [message(100), message(101)])
    board.reply(message(101, error="client partition 1 failed during training of round 2: ValueError"))
    board.finish([], ["round 2 train: node 100: no reply within the round timeout"])
    for stream in (io.StringIO(), FakeTerminal()):
        view = ProgressView(tmp_path, 2, stream=stream)
        view.poll()
        view.poll()
        view.close()
        output = stream.getvalue()
        assert output.count("round 2/2 client 1: FAILED in train (1/2): client partition 1 failed") == 1
        assert output.count("round 2/2 client 0: no train reply (no reply within the round timeout)") == 1


def test_nodes_that_all_say_partition_0_are_named_by_node(tmp_path):
    """Deployment clients serving their own file all reply partition 0: their node ids tell them apart."""
    board = ReplyBoard(tmp_path, min_interval=0)
    board.start(1, "train", [message(5), message(6)])
    board.reply(message(5, 0, metrics={"train_loss": 0.5}))
    board.reply(message(6, 0, metrics={"train_loss": 0.7}))
    stream = io.StringIO()
    ProgressView(tmp_path, 1, stream=stream).poll()
    assert stream.getvalue().splitlines() == [
        "  round 1/1 node 5: replied to train (1/2), train_loss 0.5000",
        "  round 1/1 node 6: replied to train (2/2), train_loss 0.7000",
    ]


def test_terminal_output_draws_a_bar_per_client_and_one_for_replies(tmp_path):
    stream = FakeTerminal()
    view = ProgressView(tmp_path, num_rounds=3, stream=stream)
    assert view.terminal
    write_round(tmp_path, 1, {100: 5, 101: 10}, replied=[101])
    view.poll()
    drawn = stream.getvalue()
    assert "\r" in drawn
    assert "round 1/3 train replies: 1/2" in drawn
    assert "round 1/3 client 0:  25%|" in drawn and "5/20" in drawn and "loss=0.2000" in drawn
    assert "round 1/3 client 1:  50%|" in drawn and "loss=0.1000, replied" in drawn
    assert "client 0: step" not in drawn  # no plain lines on a terminal
    assert len(view.bars) == 3

    view.write("round 1/3 | clients 2/2 | ...")  # above the bars, which are drawn again
    assert "round 1/3 | clients 2/2 | ...\n" in stream.getvalue()

    write_round(tmp_path, 2, {100: 1})  # a new round: the bars of round 1 go
    view.poll()
    assert [bar.desc for bar in view.bars.values()] == ["round 2/3 train replies", "round 2/3 client 0"]
    view.close()
    assert view.bars == {}


def test_the_launcher_sets_the_progress_folder_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv(live_progress.PROGRESS_DIR_ENV, "/somewhere/else")
    assert live_progress.PROGRESS_DIR_ENV not in flower_env(tmp_path / ".flwr")
    env = flower_env(tmp_path / ".flwr", tmp_path / "logs" / "progress")
    assert env[live_progress.PROGRESS_DIR_ENV] == str(tmp_path / "logs" / "progress")


def test_preparing_the_folder_removes_an_earlier_runs_files(tmp_path):
    write_round(tmp_path, 4, {100: 3})
    (tmp_path / "mine.txt").write_text("kept")
    live_progress.prepare_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_the_launchers_view_imports_no_torch():
    code = "import sys, hf_flower.launch.flower; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_terminal_without_width_gets_plain_lines():
    """`script` without a terminal of its own opens a 0x0 pseudo-terminal: tqdm would draw nothing."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from hf_flower.progress.view import is_terminal

    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as stream:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
            assert not is_terminal(stream)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            assert is_terminal(stream)
    finally:
        os.close(slave)
        os.close(master)
