# make input: N rows with string id, split into F parquet files
import sys, os, pyarrow as pa, pyarrow.parquet as pq
out, n, f = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(out, exist_ok=True)
per = n // f
for i in range(f):
    ids = [f"id{j:07d}" for j in range(i*per, (i+1)*per)]
    pq.write_table(pa.table({"id": ids, "x": list(range(i*per, (i+1)*per))}), f"{out}/part{i:04d}.parquet")
