"""The FFN providers a model calls for each layer: dense ones (dense.py: in DRAM, read whole per token, or a hybrid of
both) and the sparse one (sparse.py: predicted neurons, windowed cache.py, low-rank predictor.py), all computing with
kernels.py where it is built."""
