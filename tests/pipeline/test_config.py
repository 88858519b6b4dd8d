"""Configuration checks: output URIs, validation messages, no secrets in the stored config."""

from __future__ import annotations

import pytest

from pipeline.config import InputConfig, JobConfig, ModelSpec, ResourceConfig, check_output_uri, redact_uri


@pytest.mark.parametrize("uri", ["out", "/data/out", "s3://bucket/runs/a", "gs://b/x", "file:///tmp/o"])
def test_allowed_outputs(uri: str) -> None:
    check_output_uri(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("ftp://host/out", "not allowed"),
        ("http://host/out", "not allowed"),
        ("s3://bucket/runs/../../other", r"'\.\.'"),
        ("../escape", r"'\.\.'"),
        ("s3://key:secret@bucket/out", "credentials"),
        ("s3://", "no path"),
    ],
)
def test_rejected_outputs(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_output_uri(uri)


def test_stored_config_has_no_secrets() -> None:
    config = JobConfig(
        input=InputConfig(("https://u:p@host/list.txt?token=abc",)),
        output="s3://bucket/out",
        model=ModelSpec(weights="https://host/w.pth?X-Amz-Signature=deadbeef"),
    )
    text = repr(config.to_dict())
    assert "deadbeef" not in text and "token=abc" not in text and "u:p@" not in text
    assert redact_uri("s3://bucket/key") == "s3://bucket/key"


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ModelSpec(variant="detr-r18"), "unknown variant"),
        (lambda: ResourceConfig(batch_size=0), "batch_size"),
        (lambda: ResourceConfig(min_actors=3, max_actors=2), "min_actors"),
        (lambda: ResourceConfig(num_gpus=0), "num_gpus"),
        (lambda: InputConfig(()), "at least one"),
    ],
)
def test_bad_configuration_names_the_value(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()
