"""One output, resolved once: its filesystem, its root, and the path of every entry of its layout.

Every module that touches an output builds its paths here (`Output.of(uri)`), so an output's root has one
normalisation (`locate`: fsspec's path, no protocol, no trailing slash) and each layout entry one spelling (the
names are declared in `pipeline.schema`). A command resolves its output once and hands the `Output` on; the
readers also take a URI (`Output.resolve`), for callers in Python.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from functools import cached_property

import fsspec

from pipeline.inputs.storage import is_local
from pipeline.schema import LEASE_FILE, QUARANTINE_FOLDER, RUNS_FOLDER, SNAPSHOTS_FOLDER, SUCCESS_FILE


def locate(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``uri`` and the path inside it (no protocol, no trailing slash): the one
    normalisation of a URI the commands write to or read from (an output, an export's destination).

    ``s3://`` goes through s3fs, which honours the usual AWS configuration (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws/config``, ...).
    """
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/") or path


@dataclass(frozen=True)
class Output:
    uri: str  # as the user gave it
    fs: fsspec.AbstractFileSystem
    root: str  # the path inside ``fs``: no protocol, no trailing slash
    at: int | None = None  # readers: the snapshot they read (`pipeline.reading.output_tables.pin`); None: not pinned

    @classmethod
    def of(cls, uri: str) -> Output:
        """Resolve ``uri`` (`locate`): the one place an output URI becomes a filesystem and a root."""
        return cls(uri, *locate(uri))

    @classmethod
    def resolve(cls, output: Output | str) -> Output:
        """``output`` itself when it is already resolved, else `Output.of` it."""
        return output if isinstance(output, Output) else cls.of(output)

    @cached_property
    def _listed_root(self) -> str:
        """The root as a listing of ``fs`` spells it: a local root with its symbolic links resolved."""
        return os.path.realpath(self.root).rstrip("/") if is_local(self.fs) else self.root

    def holds(self, fs: fsspec.AbstractFileSystem, path: str) -> bool:
        """Whether ``path``, listed on ``fs``, is the output's root or lies under it (a path of another kind of
        filesystem never does)."""
        if type(fs) is not type(self.fs):
            return False
        root = self._listed_root
        return path == root or path.startswith(root + "/")

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

    @property
    def snapshots(self) -> str:
        """The folder of the snapshot log (`pipeline.exactly_once.snapshots`)."""
        return posixpath.join(self.root, SNAPSHOTS_FOLDER)

    def run_record(self, run_id: str) -> str:
        return posixpath.join(self.root, RUNS_FOLDER, f"{run_id}.json")

    def quarantine(self, run_id: str, table: str) -> str:
        """The folder an unreadable part of ``table`` is moved to by run ``run_id``."""
        return posixpath.join(self.root, QUARANTINE_FOLDER, run_id, table)
