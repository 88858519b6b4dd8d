"""`pipeline.error_budget`: error kinds of the messages the pipeline writes, and the budget over part rows.

The kinds are checked on messages made by the pipeline's own readers and decoder where a test can make them
cheaply (a missing file, a FIFO, an object over ``--max-bytes``, access denied, a non-image, a tar that is none),
and on the other messages as their modules write them. The budget is fed `PART_ROW_SCHEMA` rows as the driver
receives them; the job that stops on it is tests/jobs/test_error_budget_job.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import botocore.exceptions
import pyarrow as pa
import pytest

import pipeline.inputs.readers
from model.config import InferenceConfig
from pipeline.error_budget import ErrorBudget, error_kind, error_kinds
from pipeline.exactly_once.commit import OutputCommitter
from pipeline.exactly_once.lease import Lease
from pipeline.inputs.decode import decode_input
from pipeline.inputs.readers import read_ref
from pipeline.schema import PART_ROW_SCHEMA, RESULT_SCHEMA
from pipeline.segmenting.predict import OUT_OF_MEMORY
from tests.pipeline.images import photo_bytes


def _read_error(uri: Path, kind: str = "file", **options: int) -> str:
    (row,) = read_ref(str(uri), kind, [], bytes_column="image", id_column=None, **options)
    assert row.error, "the read was expected to fail"
    return row.error


def _decode_error(data: bytes) -> str:
    error = decode_input(data, max_pixels=1 << 26, inference=InferenceConfig(min_size=64, max_size=107)).error
    assert error, "the decode was expected to fail"
    return error


def test_the_readers_errors_have_their_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(photo_bytes(32, 40))
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    not_a_tar = tmp_path / "s.tar"
    not_a_tar.write_bytes(b"this is no tar archive at all" * 40)
    assert error_kind(_read_error(tmp_path / "gone.jpg")) == "not found"
    assert error_kind(_read_error(fifo)) == "not a regular file"
    assert error_kind(_read_error(big, max_bytes=10)) == "larger than --max-bytes"
    assert error_kind(_read_error(not_a_tar, "tar")) == "unreadable: not a tar archive"

    def denied(uri: str, **kwargs: object) -> None:
        error = {"Error": {"Code": "AccessDenied", "Message": f"Access Denied to {uri}"}}
        raise botocore.exceptions.ClientError(error, "GetObject")

    monkeypatch.setattr(pipeline.inputs.readers, "read_object", denied)
    message = _read_error(big)
    assert "AccessDenied" in message and str(big) in message  # the specifics are in the message...
    assert error_kind(message) == "unreadable: ClientError"  # ...not in its kind


def test_the_decoders_errors_have_their_kinds() -> None:
    jpeg = photo_bytes(32, 40)
    assert error_kind(_decode_error(b"hello, this is text, not an image")) == "not a supported image format"
    assert error_kind(_decode_error(b"")) == "empty object"
    kinds = {error_kind(_decode_error(jpeg[:n])) for n in (40, 200, len(jpeg) // 2)}  # cut short, three ways
    assert kinds and all(k.startswith(("corrupt", "empty")) and len(k.split(": ")) <= 2 for k in kinds), kinds


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("not found: [Errno 2] No such file or directory: '/data/a.jpg'", "not found"),
        ("not found: member 'a.jpg' not found in s3://b/x.tar", "not found"),
        ("unreadable: PermissionError: [Errno 13] Permission denied: '/x/y.jpg'", "unreadable: PermissionError"),
        (
            "unreadable: ClientError: An error occurred (AccessDenied) when calling the GetObject operation: Access "
            "Denied s3://b/k",
            "unreadable: ClientError",
        ),
        ("larger than --max-bytes (5000 > 4096 bytes); not read", "larger than --max-bytes"),
        ("unreadable: corrupt Parquet data: Couldn't deserialize thrift", "unreadable: corrupt Parquet data"),
        ("truncated tar: member a/b.jpg is cut short", "truncated tar"),
        (
            "truncated or corrupt tar after member a/b.jpg: unexpected end of data",
            "truncated or corrupt tar after member",
        ),
        ("no column 'image' with image bytes (columns: a, b; see --bytes-column)", "no column with image bytes"),
        ("repeated image id 'x' in this shard (its first row is kept)", "repeated image id in this shard"),
        ("repeated image id 'x' (also read from s3://b/a.tar)", "repeated image id"),
        ("extreme aspect ratio: 10000x1 resizes to 1333x1 (min_size=800, max_size=1333)", "extreme aspect ratio"),
        ("out of memory decoding a 9000x9000 JPEG image", "out of memory decoding a JPEG image"),
        ("too many pixels (rejected on the header): 100000x100000 = 10000000000 > cap 89478485", "too many pixels"),
        (
            "corrupt or truncated JPEG image: OSError: image file is truncated (3 bytes not processed)",
            "corrupt or truncated JPEG image: OSError",
        ),
        ("corrupt image header: JPEG signature, but the header cannot be parsed", "corrupt image header"),
        (
            "corrupt image header: UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7f>",
            "corrupt image header: UnidentifiedImageError",
        ),
        ("empty image: header says 0x0", "empty image"),
        ("undecodable: KeyError", "undecodable: KeyError"),
        (OUT_OF_MEMORY, OUT_OF_MEMORY),
        ("no result", "no result"),
        ("", "error"),
    ],
)
def test_a_kind_is_the_message_without_its_specifics(message: str, kind: str) -> None:
    assert error_kind(message) == kind


def test_a_kind_is_short_and_one_line() -> None:
    kind = error_kind("a very long reason " * 20 + "\nwith a second line: and more")
    assert len(kind) <= 80 and "\n" not in kind


def test_a_parts_kinds_count_its_error_rows_most_common_first() -> None:
    errors = [None, "not found: x", "unreadable: OSError: a", "unreadable: OSError: b", "", None]
    assert error_kinds(errors) == [{"kind": "unreadable: OSError", "count": 2}, {"kind": "not found", "count": 1}]
    assert error_kinds([None, None]) == []


def test_a_committed_parts_row_carries_its_error_kinds(tmp_path: Path) -> None:
    def result(image_id: str, error: str | None) -> dict[str, object]:
        return {"image_id": image_id, "source": image_id, "status": "error" if error else "ok", "error": error,
                "retryable": bool(error), "segments": []}  # fmt: skip

    rows = [result("a.jpg", None), result("b.jpg", "unreadable: PermissionError: [Errno 13] b.jpg")]
    rows += [result("c.jpg", "unreadable: PermissionError: [Errno 13] c.jpg"), result("d.jpg", "not found: d.jpg")]
    output = tmp_path / "out"
    with Lease.acquire(str(output), "r1"):
        row = OutputCommitter(str(output), "r1").write_part(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA))
    assert row is not None and (row["images_ok"], row["images_error"]) == (1, 3)
    kinds = [{"kind": "unreadable: PermissionError", "count": 2}, {"kind": "not found", "count": 1}]
    assert row["error_kinds"] == kinds
    received = pa.Table.from_pylist([row], schema=PART_ROW_SCHEMA).to_pylist()[0]  # what the driver receives
    assert {name: received[name] for name in row} == row


# -- the budget ------------------------------------------------------------------------------------------------


def _part(ok: int, errors: int, kind: str = "unreadable: PermissionError") -> dict[str, object]:
    kinds = [{"kind": kind, "count": errors}] if errors else []
    return {"images_ok": ok, "images_error": errors, "error_kinds": kinds}


def _first_stop(budget: ErrorBudget, parts: list[dict[str, object]]) -> int | None:
    """The index of the part after which the budget is exceeded (None: never)."""
    for i, part in enumerate(parts):
        budget.add(part)
        if budget.exceeded():
            return i
    return None


def test_spread_out_bad_files_never_stop_a_job() -> None:
    """A bad file in every few, even 40 % of all images in an unlucky stretch: never more than half."""
    budget = ErrorBudget(max_error_rate=0.5, error_window=2000)
    parts = [_part(8 - i % 3, i % 3, "corrupt image header") for i in range(10_000)]  # 1 in 8 on average
    parts += [_part(5, 3, "not found")] * 1000  # 37.5 % for 8,000 images
    assert _first_stop(budget, parts) is None
    assert budget.images >= 2000 and 0 < budget.errors <= budget.images // 2


def test_a_systematic_failure_stops_a_job_once_the_window_is_full() -> None:
    budget = ErrorBudget(max_error_rate=0.5, error_window=40)
    parts = [_part(8, 0)] * 10 + [_part(0, 8)] * 10  # every read fails after the first 80 images
    # the window holds the latest 5 parts (40 images): 3 failed parts of 5 are 60 %
    assert _first_stop(budget, parts) == 12
    assert (budget.images, budget.errors) == (40, 24)
    assert budget.verdict() == (
        'stopped: 24 of the last 40 images failed (most common: "unreadable: PermissionError", 24 images); '
        "the parts committed so far are kept: fix the cause and re-run the same command to resume, or raise "
        "--max-error-rate"
    )


def test_a_failure_from_the_first_image_waits_for_a_full_window() -> None:
    budget = ErrorBudget(max_error_rate=0.5, error_window=40)
    assert _first_stop(budget, [_part(0, 8)] * 4) is None  # 32 images: too few to judge
    budget.add(_part(0, 8))
    assert budget.exceeded() and (budget.images, budget.errors) == (40, 40)


def test_the_window_forgets_what_is_older_than_its_images() -> None:
    """A burst of errors long ago does not count against the latest images; the kinds leave with their parts."""
    budget = ErrorBudget(max_error_rate=0.5, error_window=40)
    parts = [_part(3, 5, "not found")] * 3 + [_part(8, 0)] * 5 + [_part(4, 4, "unreadable: OSError")] * 2
    assert _first_stop(budget, parts) is None
    assert (budget.images, budget.errors) == (40, 8)  # the latest 5 parts: the "not found" parts left
    for _ in range(3):
        budget.add(_part(0, 8, "unreadable: OSError"))
    assert budget.exceeded() and (budget.images, budget.errors) == (40, 32)
    assert '"unreadable: OSError", 32 images' in budget.verdict()


def test_the_window_counts_whole_parts() -> None:
    """Parts of 30 in a window of 40: the latest two parts (60 images), never fewer than 40."""
    budget = ErrorBudget(max_error_rate=0.5, error_window=40)
    budget.add(_part(30, 0))
    budget.add(_part(30, 0))
    budget.add(_part(0, 30))
    assert (budget.images, budget.errors) == (60, 30) and not budget.exceeded()  # half is not more than half
    budget.add(_part(1, 29))
    assert (budget.images, budget.errors) == (60, 59) and budget.exceeded()


def test_a_rate_of_one_never_stops() -> None:
    budget = ErrorBudget(max_error_rate=1.0, error_window=10)
    assert _first_stop(budget, [_part(0, 8)] * 100) is None


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="max_error_rate"):
        ErrorBudget(max_error_rate=0, error_window=10)
    with pytest.raises(ValueError, match="error_window"):
        ErrorBudget(max_error_rate=0.5, error_window=0)
