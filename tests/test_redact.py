"""The one redaction (raytrainer/redact.py): URIs of any scheme, field names on any word, env secrets, errors, logs."""

from __future__ import annotations

import logging

import pytest

import raytrainer
from raytrainer import storage
from raytrainer.redact import REDACTED, redact, redact_json, redact_text, redacted_errors


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://user:pg-pass-1@db.example:5432/mlflow", "postgresql://db.example:5432/mlflow"),
    ("mysql+pymysql://u:my-pass-2@host/db", "mysql+pymysql://host/db"),
    ("s3://AKID:s3-secret-3@bucket/runs?secret_key=q-secret-4&region=eu", "s3://bucket/runs?secret_key=<redacted>&region=eu"),
    ("https://h/x?X-Amz-Signature=sig-5&X-Amz-Credential=cred-6&v=1", "https://h/x?X-Amz-Signature=<redacted>&X-Amz-Credential=<redacted>&v=1"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),  # untouched: nothing secret, no normalisation
])
def test_uris_of_any_scheme_lose_userinfo_and_secret_query_values(uri, shown):
    assert redact_text(f"tracking at {uri} now") == f"tracking at {shown} now"


def test_field_names_match_on_any_word_and_numbers_stay():
    params = redact({"access_token_env": "tok-a", "api_token_value": "tok-b", "AWSAccessKeyId": "AKID",
                     "pad_token_id": 0, "learning_rate": 0.1, "nested": {"db_password": "pw"}, "empty_token": ""})
    assert params == {"access_token_env": REDACTED, "api_token_value": REDACTED, "AWSAccessKeyId": REDACTED,
                      "pad_token_id": 0, "learning_rate": 0.1, "nested": {"db_password": REDACTED}, "empty_token": ""}
    assert "tok-a" not in redact_json({"x": {"access_token_env": "tok-a"}})


def test_env_secrets_and_pairs_are_masked_in_free_text(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_TOKEN", "env-secret-7777")
    assert redact_text("failed with env-secret-7777 and password=hunter22") == f"failed with {REDACTED} and password={REDACTED}"


def test_a_preflight_error_never_echoes_the_storage_secret():
    with pytest.raises(ValueError) as info:
        raytrainer.TrainingArguments(output_dir="/tmp/x", storage_path="gs://AKID:gcs-secret-8@bucket/runs")
    assert "gcs-secret-8" not in str(info.value) and "gs://bucket/runs" in str(info.value)
    # s3: pyarrow's own error would repeat the path without its scheme (key:secret@bucket): refused first
    with pytest.raises(ValueError, match="credentials in an s3:// URI are not read") as info:
        raytrainer.TrainingArguments(output_dir="/tmp/x", storage_path="s3://AKID:s3-secret-7@bucket/runs",
                                     num_workers=1).check_supported()
        storage.preflight_storage("s3://AKID:s3-secret-7@bucket/runs")
    assert "s3-secret-7" not in str(info.value) and "s3://bucket/runs" in str(info.value)
    with pytest.raises(RuntimeError, match="s3://b/p") as info:
        with redacted_errors():
            raise RuntimeError("cannot open s3://k:err-secret-9@b/p")
    assert "err-secret-9" not in str(info.value)


def test_raytrainer_log_records_are_redacted(caplog):
    with caplog.at_level(logging.INFO, logger="raytrainer"):
        logging.getLogger("raytrainer").info("uri %s", "postgresql://u:log-secret-10@h/db")
    assert "log-secret-10" not in caplog.text and "postgresql://h/db" in caplog.text


@pytest.mark.parametrize("name", ["metric_key_prefix", "ignore_keys", "ignore_keys_for_eval", "sort_keys", "key_name",
                                  "label_key", "dataset_text_field", "pad_token", "eos_token", "token_type_ids"])
def test_names_that_only_name_keys_or_tokens_survive(name):
    """Over-redaction hid evaluate()'s `metric_key_prefix=eval` ("key" is a secret word): names of keys are no secret."""
    assert redact({name: "eval_x"}) == {name: "eval_x"}
    assert redact_text(f"evaluate({name}=eval_x) failed") == f"evaluate({name}=eval_x) failed"


@pytest.mark.parametrize("name", ["access_key", "secret_key", "api_key", "private_key", "key", "aws_secret_access_key",
                                  "hub_token", "auth_token", "access_token_env", "password", "db_password",
                                  "AWSAccessKeyId", "X-Amz-Signature", "secret_key_prefix"])
def test_real_secrets_stay_masked(name):
    assert redact({name: "s3cr3t-value"}) == {name: REDACTED}
    assert redact_text(f"connect {name}=s3cr3t-value now") == f"connect {name}={REDACTED} now"
    assert redact_text(f"s3://b/p?{name}=s3cr3t-value") == f"s3://b/p?{name}={REDACTED}"
