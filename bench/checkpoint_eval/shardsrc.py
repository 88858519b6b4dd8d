# Synthetic V1 Datasource: n_shards read tasks; each "shard" expands into rows_per_shard member rows.
import time, numpy as np, pyarrow as pa
from ray.data.datasource import Datasource, ReadTask
from ray.data.block import BlockMetadata
class ShardSource(Datasource):
    def __init__(self, n_shards, rows_per_shard, read_sleep=0.0):
        self.n, self.r, self.s = n_shards, rows_per_shard, read_sleep
    def estimate_inmemory_data_size(self): return self.n * self.r * 30
    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        tasks = []
        for i in range(self.n):
            def f(i=i, r=self.r, s=self.s):
                time.sleep(s)
                base = i * r
                yield pa.table({"id": [f"id{j:07d}" for j in range(base, base + r)],
                                "shard": [f"shard{i:05d}"] * r,
                                "x": np.arange(base, base + r)})
            meta = BlockMetadata(num_rows=self.r, size_bytes=self.r * 30, input_files=None, exec_stats=None)
            tasks.append(ReadTask(f, meta))
        return tasks

class ShardRowSource(ShardSource):
    """One row per shard (like a tar-shard path); members only appear after expansion."""
    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        tasks = []
        for i in range(self.n):
            def f(i=i): yield pa.table({"shard": [f"shard{i:05d}"], "base": [i * self.r], "n": [self.r]})
            tasks.append(ReadTask(f, BlockMetadata(num_rows=1, size_bytes=30, input_files=None, exec_stats=None)))
        return tasks

def expand(b):  # shard row -> member rows with per-member id
    ids, sh, xs = [], [], []
    for s, base, n in zip(b["shard"], b["base"], b["n"]):
        for j in range(base, base + n):
            ids.append(f"id{j:07d}"); sh.append(s); xs.append(j)
    return {"id": np.array(ids), "shard": np.array(sh), "x": np.array(xs)}
