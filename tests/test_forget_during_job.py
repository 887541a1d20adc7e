"""A forget during a personalization job wins: the job notices before it promotes and
promotes nothing, so no adapter or phrase file holds the forgotten text, and nothing offers
it afterwards. Before the fix (issue 28, failure 1): `forget --all` at the first training
step answered "forgot 700 entries", yet the job promoted a version whose phrases counted
every forgotten word, and the daemon offered it."""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.daemon_process import short_dir
from wordahead.cli import main
from wordahead.daemon import server
from wordahead.daemon.client import DaemonClient
from wordahead.learn.adapter_store import PHRASES_FILE, AdapterStore
from wordahead.learn.personalize import FORGOTTEN, run_job
from wordahead.learn.policy import JobConfig
from wordahead.learn.progress import Progress
from wordahead.model.artifacts import Adapter
from wordahead.paths import Home
from wordahead.predict.sources.phrases import PhraseModel
from wordahead.store.typing_log import TypingLog

WORD = "dayrit"  # made up; two tokens of the tiny tokenizer, learnt in a few steps
LONG_AGO = datetime.now(timezone.utc) - timedelta(days=3)


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _type(home: Home) -> None:
    """Messages with the word (from a diary, three days ago) and without it (mail, now)."""
    with TypingLog(home.typing_log) as log:
        for i in range(40):
            log.record(f"I love {WORD} tea in the morning, day {i}.", source="diary", ts=LONG_AGO)
            log.record(f"Thank you for your help with the project, {i}.", source="mail")


def _offered(home: Home, model: Path, socket: Path) -> set[str]:
    """Every word the daemon on `home` offers where the word was typed."""
    daemon, thread = server.run_in_thread(server.ServeConfig(socket, model, home))
    try:
        with DaemonClient(socket, timeout=30) as client:
            return {
                c["word"]
                for context in ("I love ", "I love day", "I love d")
                for c in client.call("predict", context=context, k=20)["candidates"]
            }
    finally:
        daemon.stop()
        thread.join(timeout=30)


@pytest.mark.parametrize("what", [["--all"], ["--source", "diary"], ["--until", "yesterday"]])
def test_a_forget_during_the_job_wins(
    home: Home, tiny_llama: Path, root: Path, what: list[str]
) -> None:
    if what[-1] == "yesterday":
        what = ["--until", (LONG_AGO + timedelta(days=1)).isoformat()]
    _type(home)
    config = JobConfig(
        lr=5e-2, max_steps=20, warmup=3, eval_every=10, max_eval_words=100, fold_in_epochs=0,
        choose_share=False,
    )  # fmt: skip
    forgot: list[int] = []

    def forget_mid_job(adapter: Adapter) -> Adapter:
        assert main(["forget", *what]) == 0  # no daemon runs: as the CLI does it
        with TypingLog(home.typing_log) as log:
            forgot.append(log.stats()["entries"])
        return adapter

    progress = Progress(io.StringIO(), tty=False)
    result = run_job(home, tiny_llama, config=config, force=True, progress=progress,
                     after_training=forget_mid_job)  # fmt: skip
    assert forgot and result.status == "skipped" and result.reason == FORGOTTEN
    store = AdapterStore.in_home(home, tiny_llama)
    assert store.active() is None and not store.versions()  # nothing promoted
    assert not list(home.adapters.glob(f"*/*/{PHRASES_FILE}"))
    with TypingLog(home.typing_log) as log:
        assert log.watermark == 0  # the text left is new to the next job
        assert all(WORD not in text for _, text, _ in log.iter_text())
    assert WORD not in _offered(home, tiny_llama, root / "s.sock")
    if what != ["--all"]:
        return  # (the rest is the same for any forget)

    # The next job trains on what is left and what was typed since: nothing it stores holds
    # the word.
    with TypingLog(home.typing_log) as log:
        for i in range(20):
            log.record(f"Could you please send me the report by Friday, {i}?", source="mail")
    again = run_job(home, tiny_llama, config=config, force=True, progress=progress)
    assert again.status in ("promoted", "rejected"), again.reason
    for path in home.adapters.glob(f"*/*/{PHRASES_FILE}"):
        assert WORD not in PhraseModel.load(path).unigrams


def test_a_forget_waits_for_a_promotion_in_progress(home: Home) -> None:
    """The promotion and a forget never interleave: a forget asked while a job stores its
    version waits, then runs (and so deletes the phrases just stored)."""
    with TypingLog(home.typing_log) as log:
        log.record("see you at dayrit tomorrow", source="test")
        forgets = log.forgets
    done = threading.Event()

    def forget() -> None:
        with TypingLog(home.typing_log) as other:
            other.forget(everything=True)
        done.set()

    with TypingLog(home.typing_log) as job_log:
        with job_log.no_forget_meanwhile(forgets) as unchanged:
            assert unchanged
            thread = threading.Thread(target=forget)
            thread.start()
            assert not done.wait(0.5)  # blocked by the promotion
        thread.join(timeout=30)
        assert done.is_set()
        assert job_log.forgets == forgets + 1
        with job_log.no_forget_meanwhile(forgets) as unchanged:
            assert not unchanged
        with job_log.no_forget_meanwhile(job_log.forgets) as unchanged:
            assert unchanged
        job_log.forget(everything=True)  # nothing left to delete: nothing changes
        assert job_log.forgets == forgets + 1
