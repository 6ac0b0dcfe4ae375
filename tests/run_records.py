"""Reading a run's metrics.jsonl the way every reader must (tests share these)."""
import json
import os

# A probe run small enough for seconds, large enough for several epochs, a short last micro-batch
# (38 = 9 x 4 + 2) and a short last accumulation group (10 micro-batches, grad_accum 3 -> 3+3+3+1):
# 4 optimizer steps per epoch, 12 in all.
PROBE_TINY = ["data.synthetic.num_train=38", "data.synthetic.num_val=24", "data.synthetic.channels=4",
              "data.synthetic.length=128", "backbone.kwargs={width: 8, heads: 2}", "train.batch_size=4",
              "train.grad_accum=3", "train.epochs=3", "train.log_every=1", "train.eval_batch_size=16",
              "schedule.warmup=2", "optim.lr=0.01"]


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



def teacher_run(settings):
    """--set values for the plain-LM run (kd.enabled false) that makes the teacher a KD run's settings name:
    such a run trains student.*, so teacher.n_* become student.n_* (set last: they win), and the other
    teacher.*/kd.* keys, which it refuses, are left out."""
    plain = [s for s in settings if not s.startswith(("teacher.", "kd."))]
    dims = [f"student.{s[len('teacher.'):]}" for s in settings if s.startswith("teacher.n_")]
    return plain + dims + ["kd.enabled=false"]


def loud_findings(run_dir, checkpoint="last.pt"):
    """The false-positive corpus check (issue 22): every warning and critical that diagnose_and_fix.py
    --config/--log/--checkpoint reports on a finished run, and every WARNING line of its own train.log.
    A healthy run gives []. E7 is left out: a shared test machine's throughput really does drop while
    other jobs run (tests/test_healthy_runs.py pins E7 on fixed throughput numbers instead)."""
    import contextlib
    import io
    import diagnose_and_fix as dx
    out = io.StringIO()
    argv = ["--config", os.path.join(run_dir, "config.yaml"), "--log", os.path.join(run_dir, "metrics.jsonl"),
            "--checkpoint", os.path.join(run_dir, "checkpoints", checkpoint), "--json"]
    with contextlib.redirect_stdout(out):
        dx.main(argv)
    found = [(f["id"], f["severity"], f["evidence"]) for f in json.loads(out.getvalue())["findings"]
             if f["severity"] != "info" and f["id"] != "E7"]
    with open(os.path.join(run_dir, "train.log")) as f:
        return found + [line.strip() for line in f if "WARNING" in line]
