# count rows vs distinct ids in an output dir, list ckpt dir
import sys, os, glob, pyarrow.parquet as pq, pyarrow as pa, pyarrow.compute as pc
out = sys.argv[1]; ck = sys.argv[2] if len(sys.argv) > 2 else None
files = sorted(glob.glob(f"{out}/**/*", recursive=True)); files = [f for f in files if os.path.isfile(f)]
ids = []; bad = []
for f in files:
    try: ids += pq.read_table(f, columns=["id"])["id"].to_pylist()
    except Exception as e: bad.append((os.path.basename(f), str(e)[:60]))
print(f"out: files={len(files)} rows={len(ids)} distinct={len(set(ids))} unreadable={bad}")
if len(sys.argv) > 3:
    exp = int(sys.argv[3]); s = set(ids)
    print(f"missing vs id0..{exp-1}: {sum(1 for j in range(exp) if f'id{j:07d}' not in s)}")
if ck:
    if os.path.isdir(ck):
        cf = os.listdir(ck); pend = [c for c in cf if ".pending" in c]
        n = sum(pq.read_table(os.path.join(ck, c)).num_rows for c in cf if ".pending" not in c)
        print(f"ckpt: files={len(cf)} pending={len(pend)} committed_ids={n}")
    else: print("ckpt: dir absent")
