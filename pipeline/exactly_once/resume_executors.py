"""Where the resume's decision runs: `InDriver` (the whole table in this process, no Ray) or `OnRay` (per block
on Ray workers, and per partition of a hash shuffle by key).

`pipeline.exactly_once.resume.decide` is one composition of plain pyarrow stage functions
(`pipeline.exactly_once.inspection`, `pipeline.exactly_once.resume_decision`, `pipeline.exactly_once.retraction`, the
committer's `retract` hook) over either executor, so the local and the Ray plan are one algorithm: a stage gets every
row of a key in one call on both (the whole table here, a hash partition there). An executor runs a function two ways
(`each` block, `by_key` partition) and holds a result two ways (`union` of several, `keep` for several reads), and
reads rows back in the driver (`rows`). A source is a list of rows (built in the driver), a table, or what an earlier
call returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.inputs.sources import ResolvedInputs
from pipeline.inputs.storage import TRANSIENT_ERRORS

if TYPE_CHECKING:
    import ray.data

Data: TypeAlias = "pa.Table | ray.data.Dataset"
Source: TypeAlias = "Data | list[dict[str, Any]]"
Stage = Callable[..., pa.Table]  # a pyarrow table (or a dict of numpy columns) -> a pyarrow table


class PlanExecutor(Protocol):
    """Runs the resume's stage functions somewhere (see the module docstring)."""

    def each(
        self,
        fn: Stage,
        sources: Sequence[Source],
        *,
        batch_format: Literal["pyarrow", "numpy"] = "pyarrow",
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> Data:
        """``fn(batch, **kwargs)`` over the union of ``sources``, any rows in a batch (lazy on Ray)."""
        ...

    def by_key(self, fn: Stage, sources: Sequence[Source], *, key: str, keep: bool = False, **kwargs: Any) -> Data:
        """``fn(batch, **kwargs)`` over the union of ``sources``, every row of one ``key`` value in one batch;
        ``keep``: the result held for several reads."""
        ...

    def union(self, sources: Sequence[Source]) -> Data:
        """The rows of all ``sources`` (lazy on Ray)."""
        ...

    def keep(self, sources: Sequence[Source]) -> Data:
        """The rows of all ``sources``, computed once and held for several reads."""
        ...

    def rows(self, data: Data) -> Iterable[dict[str, Any]]:
        """The rows of ``data``, read in the driver (small results only: counts)."""
        ...


class InDriver:
    """The whole table in this process: each call is one call of the stage function. For a small output whose
    inputs the driver listed (`pipeline.exactly_once.resume.fits_locally`): a re-run with nothing to do starts no
    cluster."""

    def each(
        self,
        fn: Stage,
        sources: Sequence[Source],
        *,
        batch_format: Literal["pyarrow", "numpy"] = "pyarrow",
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> pa.Table:
        table = self.union(sources)
        if batch_format == "numpy":
            columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
            return fn(columns, **kwargs)
        return fn(table, **kwargs)

    def by_key(self, fn: Stage, sources: Sequence[Source], *, key: str, keep: bool = False, **kwargs: Any) -> pa.Table:
        return fn(self.union(sources), **kwargs)

    def union(self, sources: Sequence[Source]) -> pa.Table:
        tables = [pa.Table.from_pylist(s) if isinstance(s, list) else s for s in sources]
        assert all(isinstance(t, pa.Table) for t in tables), "a Ray dataset planned in the driver"
        return pa.concat_tables(tables)

    def keep(self, sources: Sequence[Source]) -> pa.Table:
        return self.union(sources)

    def rows(self, data: Data) -> list[dict[str, Any]]:
        return data.to_pylist()


class OnRay:
    """Ray workers: ``each`` is Ray Data's ``map_batches``, ``by_key`` a hash shuffle into ``partitions``
    (`shuffle_partitions`) then one call per partition; the driver never holds committed ids."""

    def __init__(self, *, partitions: int) -> None:
        self.partitions = partitions

    def each(
        self,
        fn: Stage,
        sources: Sequence[Source],
        *,
        batch_format: Literal["pyarrow", "numpy"] = "pyarrow",
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> ray.data.Dataset:
        size = {"batch_size": batch_size} if batch_size is not None else {}
        return self.union(sources).map_batches(fn, batch_format=batch_format, fn_kwargs=kwargs, **size)

    def by_key(
        self, fn: Stage, sources: Sequence[Source], *, key: str, keep: bool = False, **kwargs: Any
    ) -> ray.data.Dataset:
        shuffled = self.union(sources).repartition(self.partitions, keys=[key])  # every row of a key in one block
        result = shuffled.map_batches(fn, batch_format="pyarrow", batch_size=None, fn_kwargs=kwargs)
        return result.materialize() if keep else result

    def union(self, sources: Sequence[Source]) -> ray.data.Dataset:
        datasets = [self._dataset(s) for s in sources]
        return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]

    def keep(self, sources: Sequence[Source]) -> ray.data.Dataset:
        return self.union(sources).materialize()

    def rows(self, data: Data) -> Iterable[dict[str, Any]]:
        return data.iter_rows()

    def _dataset(self, source: Source) -> ray.data.Dataset:
        import ray.data

        if isinstance(source, list):  # rows from the driver, cut into blocks for several workers
            return ray.data.from_items(source, override_num_blocks=max(1, min(len(source), 4 * self.partitions)))
        if isinstance(source, pa.Table):
            return ray.data.from_arrow(source)
        return source


ROWS_PER_SHUFFLE_PARTITION = 250_000  # refs and committed rows (~100 B each) per resume-aggregation partition
MANIFEST_BYTES_PER_LINE = 32  # a low guess: more lines estimated, more partitions


def shuffle_partitions(inputs: ResolvedInputs, committed_images: int) -> int:
    """Partitions of the resume aggregations: one per ~250 k rows, at most one per cluster CPU (≤ 128).

    Each partition is an aggregator actor, whose start-up dominates small plans: planning 5 refs took 16.5 s
    with 4 partitions and 8.4 s with 1 on a 2-core machine (a re-run with nothing to do: 15.0 vs 3.4 s).
    A Parquet manifest counts its footer's rows, a text one its bytes (a HEAD); one that cannot be sized
    counts as large.
    """
    import ray

    rows = len(inputs.refs) + committed_images
    for manifest in inputs.manifests:
        try:
            fs, path = fsspec.core.url_to_fs(manifest)
            if manifest.lower().endswith(".parquet"):
                with fs.open(path, "rb") as f:
                    rows += pq.ParquetFile(f).metadata.num_rows
            else:
                rows += int(fs.size(path) or 0) // MANIFEST_BYTES_PER_LINE
        except (OSError, ValueError, pa.ArrowException, *TRANSIENT_ERRORS):
            rows += ROWS_PER_SHUFFLE_PARTITION * 128
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(128, cpus, -(-rows // ROWS_PER_SHUFFLE_PARTITION)))
