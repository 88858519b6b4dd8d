import argparse, time, os, sys, logging
import ray, numpy as np, pyarrow as pa
from ray.data.checkpoint import CheckpointConfig
p = argparse.ArgumentParser()
p.add_argument("--inp", default="/tmp/ckpt_eval/data/in2k")
p.add_argument("--out", required=True)
p.add_argument("--ckpt", default=None)
p.add_argument("--keep", action="store_true", help="delete_checkpoint_on_success=False")
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--actors", type=int, default=1)
p.add_argument("--cpus", type=int, default=4)
p.add_argument("--mode", default="write", choices=["write", "iter", "split"])
p.add_argument("--bs", type=int, default=50)
p.add_argument("--blocks", type=int, default=20)
p.add_argument("--src", default="shard", choices=["shard","parquet","shardrow"])
p.add_argument("--idcol", default="id")
p.add_argument("--tmbs", type=int, default=0)
p.add_argument("--slowwrite", type=float, default=0.0)
p.add_argument("--rows", type=int, default=2000)
a = p.parse_args()
t0 = time.time()
ray.init(address="local", num_cpus=a.cpus, include_dashboard=False, _temp_dir="/tmp/ckpt_eval/ray",
         logging_level=logging.WARNING, log_to_driver=False)
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
if a.tmbs: ctx.target_max_block_size = a.tmbs
if a.ckpt:
    ctx.checkpoint_config = CheckpointConfig(id_column=a.idcol, checkpoint_path=a.ckpt,
                                             delete_checkpoint_on_success=not a.keep)
class Work:
    def __call__(self, b):
        time.sleep(a.sleep)
        b["y"] = np.asarray(b["x"]) * 2
        return b
sys.path.insert(0, "/tmp/ckpt_eval"); from shardsrc import ShardSource, ShardRowSource, expand
src = ray.data.read_datasource(ShardSource(a.blocks, a.rows // a.blocks)) if a.src == "shard" else ray.data.read_parquet(a.inp)
if a.src == "shardrow": src = ray.data.read_datasource(ShardRowSource(a.blocks, a.rows // a.blocks)).map_batches(expand, batch_size=1)
ds = src.map_batches(Work, batch_size=a.bs, compute=ray.data.ActorPoolStrategy(size=a.actors))
t1 = time.time()
if a.mode == "write":
    if a.slowwrite:
        from ray.data._internal.datasource.parquet_datasink import ParquetDatasink
        class SlowSink(ParquetDatasink):
            def write(self, blocks, ctx):
                r = super().write(blocks, ctx)   # data file now on disk, checkpoint still .pending
                time.sleep(a.slowwrite)
                return r
        ds.write_datasink(SlowSink(a.out))
    else:
        ds.write_parquet(a.out, min_rows_per_file=a.bs)
    print(f"RESULT write done total={time.time()-t0:.2f}s job={time.time()-t1:.2f}s", flush=True)
else:
    import pyarrow.parquet as pq
    os.makedirs(a.out, exist_ok=True)
    it = ds.iter_batches(batch_format="pyarrow", batch_size=None) if a.mode == "iter" else \
         ds.streaming_split(1)[0].iter_batches(batch_format="pyarrow", batch_size=None)
    n = 0; first = None
    for i, b in enumerate(it):
        if first is None: first = time.time() - t1
        pq.write_table(b, f"{a.out}/drv_{os.getpid()}_{i:05d}.parquet"); n += b.num_rows
    print(f"RESULT {a.mode} rows={n} first_batch={first}s job={time.time()-t1:.2f}s", flush=True)
ray.shutdown()
