"""The error budget: a job stops early when most of its latest images fail (``--max-error-rate`` of the last
``--error-window`` images), instead of writing an error row for every image left.

A bad file is one error row among many; a systematic cause (credentials expired mid-run, a bucket policy
changed, a full disk, a store down) makes every following image an error row. `ErrorBudget` tells the two
apart on the driver from the `pipeline.schema.PART_ROW_SCHEMA` rows of the parts this run commits, in the order
they arrive: each row carries its part's counts and its ``error_kinds`` (`error_kinds`: how many of its error
rows have each *kind*, an error message with its specifics taken out: `error_kind`). The window is counted in
whole parts: the latest parts that hold at least ``error_window`` images (so up to ``error_window +
rows_per_file - 1``). The budget is exceeded when the window is full and more than ``max_error_rate`` of its
images are errors; a run with fewer images than the window never stops, and ``max_error_rate`` 1 never stops.

`pipeline.run.run_job` raises `ErrorBudgetExceeded` (its message: `ErrorBudget.verdict`, one line) from its
driver loop: the run is marked failed, its lease released, and every part committed so far stays, so a re-run
resumes (`pipeline.exactly_once.resume_decision`: it redoes the retryable error rows and keeps the others).

Plain Python: no Ray, no pyarrow.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# -- error kinds ---------------------------------------------------------------------------------------------

KIND_MAX_CHARS = 80  # a kind is a label, not a message
_EXCEPTION_NAME = re.compile(r"[A-Z][A-Za-z0-9_]*")  # `type(exc).__name__` as the pipeline's messages quote it
_SHORT_PHRASE = re.compile(r"[a-z][A-Za-z-]*(?: [A-Za-z-]+){0,3}")  # "not a tar archive", "skipped"
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_SPECIFIC_WORD = re.compile(r"\S*[0-9/\\.\[\]<>=]\S*")  # a number, a size, a path, a URI, a file name
_DETAILS = re.compile(r"\s*(?:\(|; ).*$", re.DOTALL)  # "(fifo); not read", "(also read from ...)"


def error_kind(error: str) -> str:
    """An error row's message with its specifics (URIs, ids, sizes, the library's own text) taken out, so that
    the rows of one cause share one kind.

    The kind is the message's first ``": "``-separated segment, with what is quoted, parenthesised, after a
    ``;``, or holds a digit, a path or a file name dropped; followed by the second segment when that is an
    exception's name (what comes after it is its message), or a short lower-case phrase after a one-word first
    segment (``unreadable: not a tar archive``). For example
    ``"unreadable: ClientError: An error occurred (AccessDenied) ... s3://b/k"`` -> ``"unreadable:
    ClientError"``; ``"not found: [Errno 2] No such file ..."`` -> ``"not found"``; ``"larger than --max-bytes
    (5 > 4 bytes); not read"`` -> ``"larger than --max-bytes"``; ``"unreadable: not a tar archive: ..."`` ->
    ``"unreadable: not a tar archive"``."""
    first, *rest = error.strip().split(": ")
    kind = _general(first) or "error"
    if rest:
        second = rest[0].strip()
        phrase = " " not in kind and _SHORT_PHRASE.fullmatch(second) and _general(second) == second
        if _EXCEPTION_NAME.fullmatch(second) or phrase:
            kind = f"{kind}: {second}"
    return kind if len(kind) <= KIND_MAX_CHARS else kind[: KIND_MAX_CHARS - 1].rstrip() + "…"


def _general(text: str) -> str:
    """``text`` without its specifics: quoted, parenthesised and ``;``-separated parts, words with digits,
    paths or file names."""
    text = _DETAILS.sub("", _QUOTED.sub("", text.splitlines()[0] if text.strip() else ""))
    return " ".join(_SPECIFIC_WORD.sub("", text).split())


def error_kinds(errors: Iterable[str | None]) -> list[dict[str, Any]]:
    """The ``error_kinds`` column value of one part (`pipeline.schema.ERROR_KIND_STRUCT`): ``{"kind", "count"}``
    for each `error_kind` of its error messages (None and ``""``: ok rows, not counted), most common first."""
    counts = Counter(error_kind(e) for e in errors if e)
    return [{"kind": kind, "count": n} for kind, n in counts.most_common()]


# -- the budget ----------------------------------------------------------------------------------------------


class ErrorBudgetExceeded(RuntimeError):
    """More than ``--max-error-rate`` of the latest ``--error-window`` images failed: the job stops. Its message
    is `ErrorBudget.verdict`, the one line the job prints."""


@dataclass(frozen=True)
class _Part:
    images: int
    errors: int
    kinds: Counter[str]


class ErrorBudget:
    """Fed this run's `PART_ROW_SCHEMA` rows in arrival order (`add`), it keeps the latest parts holding at least
    ``error_window`` images and says when more than ``max_error_rate`` of them are errors (`exceeded`)."""

    def __init__(self, *, max_error_rate: float, error_window: int) -> None:
        if not 0 < max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be in (0, 1], got {max_error_rate}")
        if error_window < 1:
            raise ValueError(f"error_window must be positive, got {error_window}")
        self.max_error_rate = max_error_rate
        self.error_window = error_window
        self._parts: deque[_Part] = deque()
        self._images = 0
        self._errors = 0
        self._kinds: Counter[str] = Counter()

    def add(self, row: Mapping[str, Any]) -> None:
        """One committed part's row (``images_ok``, ``images_error``, ``error_kinds``); the oldest parts leave
        the window as long as the rest still hold ``error_window`` images."""
        kinds = Counter({k["kind"]: int(k["count"]) for k in row.get("error_kinds") or ()})
        part = _Part(int(row["images_ok"]) + int(row["images_error"]), int(row["images_error"]), kinds)
        self._parts.append(part)
        self._images, self._errors = self._images + part.images, self._errors + part.errors
        self._kinds.update(part.kinds)
        while self._images - self._parts[0].images >= self.error_window:
            old = self._parts.popleft()
            self._images, self._errors = self._images - old.images, self._errors - old.errors
            self._kinds.subtract(old.kinds)
        self._kinds = +self._kinds  # drop the kinds that left the window

    @property
    def images(self) -> int:
        """Images in the window."""
        return self._images

    @property
    def errors(self) -> int:
        """Error rows among them."""
        return self._errors

    def exceeded(self) -> bool:
        """The window is full and more than ``max_error_rate`` of its images are errors."""
        return self._images >= self.error_window and self._errors > self.max_error_rate * self._images

    def verdict(self) -> str:
        """One line: how many of the window's images failed, the most common error kind and how many images it
        hit, and what to do."""
        kind, hit = self._kinds.most_common(1)[0] if self._kinds else ("unknown", self._errors)
        return (
            f'stopped: {self._errors:,} of the last {self._images:,} images failed (most common: "{kind}", '
            f"{hit:,} images); the parts committed so far are kept: fix the cause and re-run the same command to "
            f"resume, or raise --max-error-rate"
        )
