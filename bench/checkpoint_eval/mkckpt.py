# pre-populate a checkpoint dir with N committed ids (non-overlapping with input id0000000..id0001999) in F files
import sys, os, pyarrow as pa, pyarrow.parquet as pq
d, n, f = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); os.makedirs(d, exist_ok=True)
per = n // f
for i in range(f):
    pq.write_table(pa.table({"id": [f"id{j:07d}" for j in range(1_000_000 + i*per, 1_000_000 + (i+1)*per)]}), f"{d}/pre_{i:05d}.parquet")
