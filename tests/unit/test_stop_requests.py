"""Stop requests without a signal: a run's stop file, and a sweep's SIGTERM that creates it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from radiodiff.config import ConfigError, TrainConfig
from radiodiff.train.preemption import PreemptionFlag
from pipeline.tune_stop import TUNE_SIGINT, SweepStop, stop_on_signals


def test_the_stop_file_is_looked_for_at_most_every_poll_interval_and_stays_seen(tmp_path: Path) -> None:
    stop_file = tmp_path / "STOP"
    slow = PreemptionFlag(stop_file, poll_s=3600)
    assert not slow.requested()  # the first call looks
    stop_file.touch()
    assert not slow.requested()  # not again within the interval: one stat per poll_s on a shared filesystem
    fast = PreemptionFlag(stop_file, poll_s=0)
    assert fast.requested()
    stop_file.unlink()
    assert fast.requested()  # once seen, the run stops: the ranks may have agreed on it already
    assert not PreemptionFlag(None, poll_s=0).requested()


def test_a_stop_file_must_be_a_path_not_a_url() -> None:
    with pytest.raises(ConfigError, match="train.stop_file=s3://bucket/STOP must be a path"):
        TrainConfig(stop_file="s3://bucket/STOP")


class _Trial:
    def __init__(self, status: str) -> None:
        self.status = status


def test_a_sweep_ends_on_its_stop_file_only_once_no_trial_is_running(tmp_path: Path) -> None:
    stop = SweepStop(tmp_path / "STOP", poll_s=0)
    stop.on_step_begin(0, [_Trial("RUNNING"), _Trial("PENDING")])
    assert not stop.stop_all()
    (tmp_path / "STOP").touch()
    assert not stop.stop_all()  # the running trial saves and ends by itself first
    stop.on_step_begin(1, [_Trial("ERROR"), _Trial("PENDING")])
    assert stop.stop_all() and not stop(trial_id="any", result={})


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_and_a_first_ctrl_c_to_a_sweep_create_its_stop_file_and_a_second_ctrl_c_interrupts(
        tmp_path: Path) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed by the main thread only")
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig, why in ((signal.SIGTERM, "SIGTERM to radiodiff-tune"), (signal.SIGINT, "Ctrl-C to radiodiff-tune")):
        stop_file = tmp_path / sig.name
        with stop_on_signals(stop_file):
            assert os.environ[TUNE_SIGINT] == "1"  # Tuner.fit leaves SIGINT to this handler
            os.kill(os.getpid(), sig)
            _wait_for(stop_file)
            assert stop_file.exists()
            if sig == signal.SIGINT:
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(10)  # the handler raises in this thread at the next bytecode
        assert why in stop_file.read_text()
    assert {sig: signal.getsignal(sig) for sig in before} == before and TUNE_SIGINT not in os.environ


def test_a_stop_request_that_cannot_be_written_stops_the_sweep_at_once(tmp_path: Path, capfd) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed by the main thread only")
    (tmp_path / "out_dir").write_text("a file where the sweep's folder should be")  # as a full disk: OSError
    stop_file = tmp_path / "out_dir" / "STOP"
    with stop_on_signals(stop_file), pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in this thread at the next bytecode
    assert f"SIGTERM: cannot create {stop_file}" in capfd.readouterr().out and not stop_file.exists()
