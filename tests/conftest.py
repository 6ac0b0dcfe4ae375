import os
import sys
import tempfile

# tests/ helpers (shared_blocks.py) and the top-level scripts import by name.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
# The scripts' records of data files' digests (content_record) go to this session's directory, not ~/.cache.
os.environ.setdefault("KIT_CONTENT_CACHE", tempfile.mkdtemp(prefix="kit-content-"))
