"""The flash store: the on-disk format (format.py, its one reader and writer), the bundle encodings (quant.py), page
checksums (checksum.py), and the way in from a model file (sources.py reads GGUF / HF folders, convert.py writes a
store)."""
