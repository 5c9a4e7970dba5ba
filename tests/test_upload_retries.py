"""checkpoint/upload.py with_retries (tenacity): storage errors retried with backoff within the bound,
then one OSError naming the storage path and the last error; a missing local file is not retried."""

from __future__ import annotations

import logging
import time

import pytest

from raytrainer.checkpoint.upload import RETRY_ENV, with_retries


def failing(times: int, error=OSError("AWS Error NETWORK_CONNECTION curlCode: 7, Couldn't connect")):
    calls = []

    def call():
        calls.append(time.monotonic())
        if len(calls) <= times:
            raise error
        return "done"

    return call, calls


def test_an_outage_shorter_than_the_bound_is_ridden_out(caplog):
    call, calls = failing(2)
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        assert with_retries(call, "upload of checkpoint-2", "s3://b/run", bound_s=5, first_wait_s=0.05) == "done"
    assert len(calls) == 3
    assert calls[2] - calls[1] >= 2 * 0.05 * 0.9  # the wait doubles
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "raytrainer: storage s3://b/run: upload of checkpoint-2 failed"] * 2


def test_past_the_bound_one_error_names_storage_and_the_last_error():
    call, calls = failing(10**6)
    start = time.monotonic()
    with pytest.raises(OSError) as raised:
        with_retries(call, "upload of checkpoint-4", "s3://b/run", bound_s=0.3, first_wait_s=0.05)
    assert time.monotonic() - start < 0.3 + 0.2  # never sleeps past the bound
    message = str(raised.value)
    assert message.startswith("storage s3://b/run: upload of checkpoint-4 still failing after 0.3 s of retries")
    assert RETRY_ENV in message and "AWS error NETWORK_CONNECTION" in message and "AWS Error" not in message
    assert len(calls) >= 3 and isinstance(raised.value.__cause__, OSError)


def test_a_missing_local_file_and_other_errors_are_not_retried(tmp_path):
    call, calls = failing(1, FileNotFoundError(str(tmp_path / "gone")))
    with pytest.raises(FileNotFoundError):
        with_retries(call, "upload", "s3://b/run", bound_s=5)
    call, calls = failing(1, ValueError("a bug"))
    with pytest.raises(ValueError):
        with_retries(call, "upload", "s3://b/run", bound_s=5)
    assert len(calls) == 1


def test_expected_failures_early_are_quiet(caplog):
    call, _ = failing(1)
    with caplog.at_level(logging.WARNING, logger="raytrainer"):
        with_retries(call, "marker of rank 1", "s3://b/run", bound_s=5, first_wait_s=0.05, warn_after_s=60)
    assert not caplog.records
