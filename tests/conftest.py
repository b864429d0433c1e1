"""Shared test setup: one CPU thread per process (see NOTES.md: 2 threads under contention are
pathologically slow), no network, deterministic algorithms where cheap."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# caches (fewstep.paths.cache_dir) of a test session go to a temporary folder, not the user's ~/.cache
os.environ.setdefault("FEWSTEP_CACHE", tempfile.mkdtemp(prefix="fewstep-test-cache-"))

import torch  # noqa: E402

torch.set_num_threads(1)
