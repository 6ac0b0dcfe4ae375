"""Seeing a run where users look: progress lines with an ETA (E7); metric sinks and an evaluate command to come."""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train_probe as tp  # noqa: E402

TINY = ["data.synthetic.num_train=38", "data.synthetic.num_val=24", "data.synthetic.channels=4",
        "data.synthetic.length=128", "backbone.kwargs={width: 8, heads: 2}", "train.batch_size=4",
        "train.grad_accum=3", "train.epochs=3", "train.eval_batch_size=16", "schedule.warmup=2", "optim.lr=0.01"]
STEP_LINE = re.compile(r" step (\d+)/12 epoch .* elapsed \d+:\d\d:\d\d [0-9.e+-]+ steps/s ETA (\d+:\d\d:\d\d|\?)$")
PROGRESS_LINE = re.compile(r" progress: step (\d+)/12 \(\d+%\) elapsed \d+:\d\d:\d\d [0-9.e+-]+ steps/s ETA (\d+:\d\d:\d\d|\?)$")


def test_e7_without_a_terminal_every_log_line_has_an_eta_and_progress_lines_come_at_the_set_interval(tmp_path):
    # progress_every_s 0: a progress line after every step; log_every 5 puts ETA-carrying step lines at 1, 5, 10, 12.
    cfg, _ = tp.resolve_config(None, TINY + ["train.log_every=5", "train.progress_every_s=0"])
    outcome, _ = tp.train(cfg, str(tmp_path / "run"), "none", quiet=True)
    assert outcome == "finished"
    lines = open(tmp_path / "run" / "train.log").read().splitlines()
    steps = [int(m.group(1)) for m in map(STEP_LINE.search, lines) if m]
    progress = [int(m.group(1)) for m in map(PROGRESS_LINE.search, lines) if m]
    assert steps == [1, 5, 10, 12], lines
    assert progress == list(range(1, 13)), lines
    assert tp.CONFIG["train.progress_every_s"][0] == 60.0
