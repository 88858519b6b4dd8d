import pyarrow.parquet as pq, glob, collections, sys
d, ck = sys.argv[1], sys.argv[2]
c = collections.Counter()
for f in glob.glob(f'{d}/*.parquet'): c.update(pq.read_table(f)['shard'].to_pylist())
print('rows per shard in out (non-100 only):', {k: v for k, v in c.items() if v != 100}, 'shards present:', len(c))
ck_ = []
[ck_.extend(pq.read_table(f)['shard'].to_pylist()) for f in glob.glob(f'{ck}/*.parquet') if 'pending' not in f]
print('committed shard ids (count of rows):', dict(collections.Counter(ck_)))
