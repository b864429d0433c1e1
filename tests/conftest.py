"""Shared test setup: one CPU thread per process (see NOTES.md: 2 threads under contention are
pathologically slow), no network, deterministic algorithms where cheap."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# caches (fewstep.paths.cache_dir) of a test session go to a temporary folder, not the user's ~/.cache;
# each pytest-xdist worker gets its own, so two workers never write the same cache entry at once
if "PYTEST_XDIST_WORKER" in os.environ or "FEWSTEP_CACHE" not in os.environ:
    os.environ["FEWSTEP_CACHE"] = tempfile.mkdtemp(prefix="fewstep-test-cache-")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests that launch several processes use accelerate's fixed port (29500): under pytest-xdist
    they share one group, so ``--dist loadgroup`` runs them one after another on one worker."""
    import pytest

    for item in items:
        if item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
