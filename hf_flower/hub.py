"""Pushing round folders to the Hugging Face Hub: round N to branch `round-N`, `main` to the latest.

`from_pretrained("OWNER/NAME", revision="round-3")` then loads round 3 and
`from_pretrained("OWNER/NAME")` the latest round, with their model cards. The same code pushes
live from the ServerApp (`RoundPusher`, in a background thread, so training never waits on the
network) and after the fact (`scripts/push.py`). What is pushed carries aggregate metrics only
(`round_operations`): which node or partition sent what, and why a client failed, stay in the
local history.json.

A push uploads exactly the checked files of a round: those its checksums.json lists, each found
as it was saved (`checkpoint.checked_files`), never a link and never a file the list does not
name, so nothing placed in a round folder after it was saved (a link to a token, a stray file)
leaves this machine. Repositories are created private unless `--hub_private false` asks for a
public one; an existing repository keeps its visibility.

The token is never an argument, in a config or in a log: huggingface_hub finds it in `HF_TOKEN`
or the login saved by `hf auth login`. `check_push_access` runs before round 1 and refuses a
missing or rejected token, a read-only token, and a repo in a namespace the token cannot write
to. An upload that fails is retried a few times with growing pauses, then reported; the local
rounds are never touched.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.common.logger import log
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from . import checkpoint

MAIN_BRANCH = "main"
# Files of a round folder that stay local: the strategy's state and the checksums are for
# --resume, not for users (the Hub keeps its own hashes).
IGNORE_PATTERNS = [checkpoint.STRATEGY_STATE_FILE, checkpoint.CHECKSUMS_FILE, ".*"]
# Seconds to wait before each retry of a failed upload (so len + 1 attempts in all). The
# environment variable, comma-separated seconds, overrides them (tests use short pauses).
RETRY_DELAYS = (2.0, 10.0, 30.0)
RETRY_DELAYS_ENV = "HF_FLOWER_HUB_RETRY_DELAYS"
# HTTP statuses that no retry can fix: bad token, no permission, no such repo, bad request.
PERMANENT_STATUSES = {400, 401, 403, 404, 422}
TOKEN_HELP = (
    "Set HF_TOKEN in the environment (a token with write access, from "
    "https://huggingface.co/settings/tokens) or run `hf auth login`; tokens never go in flags or config files."
)


class HubError(RuntimeError):
    """Pushing to the Hub cannot work as configured; the message says what to change."""


def hub_id(name: str | None) -> str | None:
    """`name` when it can only be a Hub id (`name` or `owner/name`, no local path), else None: a
    model card's metadata links Hub ids only."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def round_branch(round_num: int) -> str:
    """The Hub branch of round `round_num`: `round-N`, the name of its local folder."""
    return checkpoint.round_dir("", round_num).name


def retry_delays() -> tuple[float, ...]:
    text = os.environ.get(RETRY_DELAYS_ENV)
    return tuple(float(s) for s in text.split(",") if s.strip()) if text else RETRY_DELAYS


def check_push_access(hub_model_id: str | None, api: HfApi | None = None) -> str:
    """Check the repo id and the token before any training; return the full `OWNER/NAME`.

    A bare `NAME` goes under the token's user. Raises `HubError` naming the problem and the fix:
    an invalid repo id, no token, a token the Hub rejects or that is read-only, an owner the
    token cannot write to, or a Hub that cannot be reached.
    """
    api = api or HfApi()
    if not hub_model_id:
        raise HubError("--push_to_hub needs --hub_model_id OWNER/NAME (the model repo to push to).")
    try:
        validate_repo_id(hub_model_id)
    except HFValidationError as err:
        raise HubError(
            f"--hub_model_id {hub_model_id!r} is not a valid Hub repo id ({err}); use OWNER/NAME, e.g. "
            "alice/minilm-imdb-federated (letters, digits, '-', '_', '.'; at most 96 characters)."
        ) from None
    token = get_token()
    if token is None:
        raise HubError(f"--push_to_hub needs a Hugging Face token and none was found. {TOKEN_HELP}")
    try:
        me = api.whoami(token=token)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise HubError(
                f"The Hub at {api.endpoint} rejected the Hugging Face token (401: invalid or expired). {TOKEN_HELP}"
            ) from None
        raise HubError(f"Checking the token with the Hub at {api.endpoint} failed: {err}") from None
    except Exception as err:  # noqa: BLE001 - connection refused, DNS, timeouts (httpx errors)
        raise _unreachable(api, err) from None
    user = me.get("name")
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(
            f"The Hugging Face token of {user!r} is read-only; pushing needs a write token. {TOKEN_HELP}"
        )
    owner, _, name = hub_model_id.rpartition("/")
    if not owner:
        return f"{user}/{name}"
    writable = [user] + [org.get("name") for org in me.get("orgs") or [] if org.get("name")]
    if owner not in writable:
        raise HubError(
            f"--hub_model_id {hub_model_id}: {owner!r} is not you or one of your organisations, so the token "
            f"of {user!r} cannot push there (it can write to {writable}). Use --hub_model_id {user}/{name}, "
            "or a token of the owner."
        )
    return hub_model_id


def _unreachable(api: HfApi, err: Exception) -> HubError:
    return HubError(
        f"Cannot reach the Hugging Face Hub at {api.endpoint} ({type(err).__name__}: {err}). Check the "
        "network (and HF_ENDPOINT), or run without --push_to_hub and push later with scripts/push.py."
    )


def round_operations(folder: str | os.PathLike) -> list[CommitOperationAdd]:
    """The checked files of a round folder as uploads (`checkpoint.checked_files`: listed in its
    checksums.json and verified; a link or a damaged file raises `DamagedRoundError`), but
    `IGNORE_PATTERNS`, with metrics.json reduced to its aggregates (`checkpoint.aggregate_metrics`):
    per-client details never leave this machine."""
    files = checkpoint.checked_files(folder)
    operations = []
    for name in filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS):
        content: Path | bytes = files[name]
        if name == checkpoint.METRICS_FILE:
            metrics = json.loads(files[name].read_text(encoding="utf-8"))
            content = checkpoint.metrics_json(metrics).encode()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    return operations


def create_repo(repo_id: str, private: bool, api: HfApi | None = None) -> None:
    """Create the model repo if it does not exist (an existing repo keeps its visibility)."""
    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except HfHubHTTPError as err:
        raise HubError(f"Creating or opening the Hub repo {repo_id} failed: {err}") from None


class RoundPusher:
    """Push round folders from one background thread, in order, retrying failed uploads.

    `submit` returns at once; `wait` blocks until every submitted push is done and returns the
    failures by round. One worker keeps pushes in round order, so `main` only moves forward.
    """

    def __init__(self, repo_id: str, api: HfApi | None = None, delays: tuple[float, ...] | None = None):
        self.repo_id = repo_id
        self.api = api or HfApi()
        self.delays = retry_delays() if delays is None else delays
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-push")
        self.futures: dict[int, Future] = {}
        self.pushed: list[int] = []
        self.failures: dict[int, str] = {}
        self._lock = threading.Lock()

    def submit(self, round_num: int, folder: str | os.PathLike, update_main: bool = True) -> Future:
        """Queue round `round_num` (its folder) for upload to `round-N`, and to `main` when asked."""
        future = self.executor.submit(self._push, round_num, Path(folder), update_main)
        self.futures[round_num] = future
        return future

    def push(self, round_num: int, folder: str | os.PathLike, update_main: bool = True) -> bool:
        """Push one round now (in this thread); True when it succeeded."""
        self._push(round_num, Path(folder), update_main)
        return round_num not in self.failures

    def wait(self) -> dict[int, str]:
        """Wait for every queued push; return `{round: error}` of those that failed."""
        self.executor.shutdown(wait=True)
        return dict(self.failures)

    def _push(self, round_num: int, folder: Path, update_main: bool) -> None:
        branch = round_branch(round_num)
        started = time.monotonic()
        try:
            round_operations(folder)  # a link or a damaged file fails the push before the Hub is asked
            self._retry(
                f"branch {branch}", lambda: self.api.create_branch(self.repo_id, branch=branch, exist_ok=True)
            )
            for revision in (branch, MAIN_BRANCH) if update_main else (branch,):
                self._retry(
                    f"{folder.name} to {revision}",
                    lambda revision=revision: self.api.create_commit(
                        repo_id=self.repo_id,
                        # Fresh for each attempt: an upload records its progress in them.
                        operations=round_operations(folder),
                        revision=revision,
                        commit_message=f"Round {round_num}",
                    ),
                )
        except Exception as err:  # noqa: BLE001 - reported at the end; the local round is kept
            message = f"{type(err).__name__}: {err}"
            with self._lock:
                self.failures[round_num] = message
            log(
                ERROR,
                "Pushing round %s to %s failed: %s. The round is kept in %s; push it later with "
                "`python scripts/push.py %s --hub_model_id %s --rounds %s`.",
                round_num, self.repo_id, message, folder, folder.parent, self.repo_id, round_num,
            )  # fmt: skip
            return
        with self._lock:
            self.pushed.append(round_num)
        log(INFO, "Pushed round %s to %s (branch %s) in %.1f s", round_num, self.repo_id, branch,
            time.monotonic() - started)  # fmt: skip

    def _retry(self, what: str, call: Callable[[], object]) -> None:
        for attempt, delay in enumerate((*self.delays, None), start=1):
            try:
                call()
                return
            except Exception as err:
                status = getattr(getattr(err, "response", None), "status_code", None)
                if delay is None or status in PERMANENT_STATUSES:
                    raise
                log(WARNING, "Uploading %s failed (attempt %s: %s); retrying in %.1f s", what, attempt,
                    f"{type(err).__name__}: {err}".splitlines()[0], delay)  # fmt: skip
                time.sleep(delay)
