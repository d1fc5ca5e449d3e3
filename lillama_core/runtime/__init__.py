"""Where and how the engine runs: paths, devices and their lock, data parallelism, offloading, telemetry."""
