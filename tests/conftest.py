import os
import sys
import tempfile

import torch

# tests/ helpers (shared_blocks.py) and the top-level scripts import by name.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
# The scripts' records of data files' digests (content_record) go to this session's directory, not ~/.cache.
os.environ.setdefault("KIT_CONTENT_CACHE", tempfile.mkdtemp(prefix="kit-content-"))

# R4: the suite computes on ONE intra-op thread, in this process and in every process it starts (they inherit
# OMP_NUM_THREADS; run_records.launch_env() sets it for launch.sh). Float32 CPU kernels give the same bits run after
# run at a fixed thread count, whatever the machine's load, but other bits at another count (torch sums LayerNorm's
# weight gradient per thread's rows, MKL splits a long matmul's inner dimension between threads), and tests compare
# runs and processes bit for bit (resume, caches, exports, greedy replies). One thread is also the fastest for the
# tests' tiny models on a shared 2-core machine: no OpenMP barrier waits for a descheduled thread.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
