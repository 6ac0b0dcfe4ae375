import os
import sys

# tests/ helpers (shared_blocks.py) and the top-level scripts import by name.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
