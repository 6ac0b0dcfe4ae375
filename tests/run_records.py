"""Reading a run's metrics.jsonl the way every reader must (tests share these)."""
import json
import os


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def last_per_step(recs, key):
    """A resumed run logs some steps again; the last record of a step is the one that counts."""
    out = {}
    for r in recs:
        if key in r:
            out[r["step"]] = r[key]
    return [out[s] for s in sorted(out)]
