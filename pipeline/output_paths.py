"""One output, resolved once: its filesystem, its root, and the path of every entry of its layout.

Every module that touches an output builds its paths here (`Output.of(uri)`), so an output's root has one
normalisation (fsspec's path, no protocol, no trailing slash) and each layout entry one spelling (the names are
declared in `pipeline.schema`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec

from pipeline.schema import LEASE_FILE, QUARANTINE_FOLDER, RUNS_FOLDER, SUCCESS_FILE


@dataclass(frozen=True)
class Output:
    uri: str  # as the user gave it
    fs: fsspec.AbstractFileSystem
    root: str  # the path inside ``fs``: no protocol, no trailing slash

    @classmethod
    def of(cls, uri: str) -> Output:
        fs, path = fsspec.core.url_to_fs(uri)
        return cls(uri, fs, path.rstrip("/") or path)

    def table(self, table: str) -> str:
        """The folder of ``segments`` or ``images``."""
        return posixpath.join(self.root, table)

    def part(self, table: str, name: str) -> str:
        return posixpath.join(self.root, table, name)

    @property
    def lease(self) -> str:
        return posixpath.join(self.root, LEASE_FILE)

    @property
    def success(self) -> str:
        return posixpath.join(self.root, SUCCESS_FILE)

    @property
    def runs(self) -> str:
        """The folder of the run records."""
        return posixpath.join(self.root, RUNS_FOLDER)

    def run_record(self, run_id: str) -> str:
        return posixpath.join(self.root, RUNS_FOLDER, f"{run_id}.json")

    def quarantine(self, run_id: str, table: str) -> str:
        """The folder an unreadable part of ``table`` is moved to by run ``run_id``."""
        return posixpath.join(self.root, QUARANTINE_FOLDER, run_id, table)
