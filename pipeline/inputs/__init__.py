"""Inputs: listing them as refs (sources), reading refs into image rows (readers, storage), image ids, decoding."""
