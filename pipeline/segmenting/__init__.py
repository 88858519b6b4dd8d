"""The model actor's call over one work block: read, decode, segment, encode RLE, commit; its threads, clock, poison
isolation and metrics."""
