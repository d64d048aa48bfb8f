"""gru-lm: character-level recurrent language models, trained and compared honestly."""

import os

# Idle OpenMP threads sleep instead of spinning (unless the user chose): two trainings on
# shared cores then each keep most of their speed instead of a few percent (measured in
# benchmarks/concurrency.py). Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
