"""Measuring tools, apart from the engine (which never imports them): calibration and evaluation, the device probe,
the benchmark and its baselines under cgroup limits, the I/O simulation, the server load test, the bench model's
download."""
