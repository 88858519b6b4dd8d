"""A run's record, ``OUTPUT/_runs/<run_id>.json``: what it holds, writing and reading it, and the settings check
between the runs that share an output.

A record holds the run's settings (`model_settings`: what changes a row's content), its weights (redacted URI,
sha256), its config and command line (redacted), versions, its output format (`OUTPUT_FORMAT_VERSION`) and,
once the run ends, its status and counts. `pipeline.exactly_once.commit` writes it (before the run's first commit,
and when the run finishes or fails); `check_settings` compares a new run's settings with every recorded run's. Records
are read one way, `read_run_records`; the readers' `latest_run_record` and `run_weights` are views of it.
"""

from __future__ import annotations

import json
import logging
import platform
import posixpath
import sys
import time
from dataclasses import asdict
from typing import Any

from pipeline.config import JobConfig, redact_uri
from pipeline.exactly_once.output_paths import Output
from pipeline.inputs.storage import publish
from pipeline.schema import OUTPUT_FORMAT_VERSION, SYNTHETIC_WEIGHTS

log = logging.getLogger(__name__)


class SettingsChanged(ValueError):
    """This run's model settings differ from those the output was made with (one line for the user)."""


def model_settings(config: JobConfig, weights_sha256: str) -> dict[str, Any]:
    """The settings that change a row's content: two runs into one output must agree on them.
    (``channels_last`` is left out: fp32 either way, equal at the float32 noise floor.) ``weights_sha256`` is
    ``""`` for the demo weights, recorded as ``"synthetic"``."""
    inference = {k: v for k, v in asdict(config.inference).items() if k != "channels_last"}
    return {
        "variant": config.model.variant,
        "weights_sha256": weights_sha256 or SYNTHETIC_WEIGHTS,
        "max_pixels": config.input.max_pixels,
        **inference,
    }


def new_record(config: JobConfig, run_id: str, *, weights: str, sha256: str) -> dict[str, Any]:
    """A run's record as it starts (``status: running``); secrets in URIs and the command line redacted."""
    import ray
    import torch

    return {
        "run_id": run_id,
        "format_version": OUTPUT_FORMAT_VERSION,
        "status": "running",
        "started": now(),
        "command": [redact_uri(a) for a in sys.argv],
        "config": config.to_dict(),
        "settings": model_settings(config, sha256),
        "weights": {"uri": redact_uri(weights), "sha256": sha256},
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
    }


def now() -> str:
    """The local time as records write it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def publish_record(out: Output, record: dict[str, Any]) -> None:
    """Write ``record`` to ``_runs/<run_id>.json`` whole (replacing the run's earlier record)."""
    publish(out.fs, out.run_record(record["run_id"]), json.dumps(record, indent=2, default=str).encode())


def read_run_records(out: Output) -> list[dict[str, Any]]:
    """The records in ``_runs/``, oldest first (run ids sort by time), listed afresh: the one way ``_runs/`` is
    read (the run's settings check, and the readers' views below).

    No ``_runs/`` folder gives ``[]``. A record that cannot be read (gone since the listing, not JSON, not a JSON
    object) is left out with a warning; a record without a ``run_id`` gets its file name's.
    """
    fs, folder = out.fs, out.runs
    fs.invalidate_cache(folder)  # another run may have written here since this process last listed it
    try:
        paths = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    records = []
    for path in paths:
        try:
            record = json.loads(fs.cat_file(path))
        except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError) as exc:
            log.warning("ignoring unreadable run record %s (%s)", path, exc)
            continue
        if not isinstance(record, dict):
            log.warning("ignoring unreadable run record %s (not a JSON object)", path)
            continue
        record.setdefault("run_id", posixpath.basename(path).removesuffix(".json"))
        records.append(record)
    return records


def latest_run_record(out: Output) -> dict[str, Any]:
    """The record of the output's latest readable run (`read_run_records`' last): ``config``, ``settings``,
    ``weights``, ``versions``, counts; ``{}`` when the output has none."""
    records = read_run_records(out)
    return records[-1] if records else {}


def run_weights(out: Output) -> dict[str, str]:
    """``{run_id: weights URI}`` of the output's readable run records (`read_run_records`); ``"synthetic"`` marks
    a run made with the deterministic demo weights, whose segments are meaningless."""
    return {str(r["run_id"]): str((r.get("weights") or {}).get("uri", "")) for r in read_run_records(out)}


def check_settings(records: list[dict[str, Any]], settings: dict[str, Any], *, allow: bool) -> None:
    """Raise `SettingsChanged` when a recorded run's settings differ from ``settings`` (unless ``allow``)."""
    for record in records:
        theirs = dict(record.get("settings", {}))
        if theirs.get("weights_sha256") == "auto":  # recorded so before, by `auto` falling back to the demo weights
            theirs["weights_sha256"] = SYNTHETIC_WEIGHTS
        differ = {k: (theirs[k], v) for k, v in settings.items() if k in theirs and theirs[k] != v}
        if differ and not allow:
            what = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in sorted(differ.items()))
            raise SettingsChanged(
                f"the output was made with {what} by run {record.get('run_id', '?')}; use another --output, "
                "or --allow-mixed-settings to add rows made with these settings on purpose"
            )
