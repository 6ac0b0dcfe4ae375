"""Simulate a config's whole LR schedule in seconds, plot it, and prove it matches what training does.

    python test_scheduler_dry_run.py configs/probe_synthetic.yaml
    python test_scheduler_dry_run.py configs/tuab_4s.yaml --num_samples 409455 --world_size 4
    python test_scheduler_dry_run.py CONFIG --set train.grad_accum=8 --resume_at 1000 --out /tmp/sched

A tool, not a pytest module (pytest.ini collects tests/ only; its tests are tests/test_scheduler_tool.py).
It re-implements nothing: it imports the training script the config's `task` names (train_probe.py,
train_distill.py) and uses that script's own config loader (resolve_config), data size (train_set_size:
.npy headers or synthetic sizes, never the data), step plan (plan_schedule: the one accumulation rule),
curve (lr_curve: the real torch scheduler, stepped once per optimizer step) and checks (check_lr_curve).

Prints the step derivation, a table of landmark LRs and an ASCII plot; writes lr.csv (`step,lr`: the
1-based optimizer step and the LR that step used, the convention of metrics.jsonl) and lr.png when
matplotlib is installed, into --out (default runs/<run_name>/schedule/).

Exit codes: 0 every check passed; 1 a check failed (each reason printed with its FAILURE_MODES.md row id);
2 the config or the command line is unusable (one line per problem, nothing written).
"""
import argparse
import importlib.util
import math
import os
import sys
import time

import numpy as np
import yaml

REPO = os.path.dirname(os.path.abspath(__file__))
PLOT_WIDTH, PLOT_HEIGHT = 60, 15


class BadInput(Exception):
    """Unusable command line or config: printed as one line per problem, exit code 2."""


# -----------------------------------------------------------------------------
# Command line, the config's task and its training script.
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML config of a training script (its `task` picks the script)")
    parser.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override config keys as the training script would, e.g. --set train.grad_accum=8 "
                             "train.batch_size=32 (repeatable)")
    parser.add_argument("--num_samples", type=int,
                        help="training samples per epoch (after data.limit) when the data is not on this machine")
    parser.add_argument("--world_size", type=int, default=1, help="processes the run will use (default 1)")
    parser.add_argument("--resume_at", type=int,
                        help="save/restore the scheduler after this optimizer step (default: the middle of the run)")
    parser.add_argument("--out", help="output directory for lr.csv / lr.png (default runs/<run_name>/schedule)")

    def one_line_error(message):  # argparse's default is usage + message; bad input is one line here
        raise BadInput(f"command line: {message}")

    parser.error = one_line_error
    args = parser.parse_args(argv)
    args.set = [item for group in args.set for item in group]  # --set a=1 b=2 and --set a=1 --set b=2 alike
    if args.num_samples is not None and args.num_samples < 1:
        raise BadInput(f"--num_samples: {args.num_samples} must be >= 1")
    if args.world_size < 1:
        raise BadInput(f"--world_size: {args.world_size} must be >= 1")
    return args


def configured_task(path, overrides):
    """The `task` key, read the way launch.sh reads it, only to pick the script; that script's own
    loader then validates the whole config (an unreadable file falls through to it and is reported there)."""
    task = "probe"
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
        if isinstance(raw, dict) and raw.get("task") is not None:
            task = raw["task"]
    except (OSError, yaml.YAMLError):
        pass
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "task":
            task = value.strip()
    return str(task)


def load_script(task):
    """train_<task>.py from this repository (never from elsewhere on sys.path), imported once."""
    name, path = f"train_{task}", os.path.join(REPO, f"train_{task}.py")
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "") or "") == path:
        return loaded
    if not task.isidentifier() or not os.path.isfile(path):
        present = sorted(f[6:-3] for f in os.listdir(REPO) if f.startswith("train_") and f.endswith(".py"))
        missing = " (train_distill.py is not in this checkout yet)" if task == "distill" else ""
        raise BadInput(f"task: {task!r} needs {path}, which does not exist{missing}; "
                       f"tasks with a script here: {', '.join(present)}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a half-written script: say so in one line rather than a traceback
        del sys.modules[name]
        raise BadInput(f"task: {task!r}: {path} cannot be imported ({type(err).__name__}: {err})") from None
    return module


def dataset_size(script, cfg, num_samples):
    """(training samples, where that number came from): --num_samples, else the script's train_set_size
    (file headers or synthetic sizes, never the data itself)."""
    if num_samples is not None:
        return num_samples, "--num_samples"
    try:
        n = script.train_set_size(cfg)
    except OSError as err:
        where = err.filename or err
        raise BadInput(f"the training data is not on this machine ({where}); give --num_samples N, "
                       "the number of training samples per epoch") from None
    except ValueError as err:
        raise BadInput(f"the training data cannot be sized from its header ({err}); give --num_samples N") from None
    files = [f"{k} = {v}" for k, v in cfg.items() if k.startswith("data.train") and isinstance(v, str)]
    how = f"size/header of {files[0]}" if files else "no data file configured: the script's synthetic/built-in data"
    return n, f"{script.__name__}.train_set_size: {how}"


# -----------------------------------------------------------------------------
# The plan and its derivation: every number below comes from the script's plan_schedule.
def plan_or_failures(script, cfg, num_samples, world_size):
    """(plan, failures, shown). A ConfigError with schedule rows (S2 sized in micro-batches, S3 warmup
    too long) is a failed check, not a config error; value problems (C rows) stay exit 2. On a failed
    check `shown` is the plan with the failing keys neutralised (total_steps derived; warmup half the
    run if it was the problem), so the derivation of the real step counts can still be printed."""
    try:
        plan = script.plan_schedule(cfg, num_samples, world_size)
        return plan, [], plan
    except script.ConfigError as err:
        bad_values = [p for p in err.problems if not p[0].startswith("S")]
        if bad_values:
            raise BadInput("\n".join(f"config error: {key}: {msg}" for _, key, msg in bad_values)) from None
        failures = [(rid, f"{key}: {msg}") for rid, key, msg in err.problems]
    for neutral in ({"schedule.total_steps": None}, {"schedule.total_steps": None, "schedule.warmup": 0.5}):
        try:
            return None, failures, script.plan_schedule({**cfg, **neutral}, num_samples, world_size)
        except script.ConfigError:
            continue
    return None, failures, None


def print_derivation(say, cfg, plan, source, warmup_known=True):
    n, b, w, a = plan["num_samples"], plan["batch_size"], plan["world_size"], plan["grad_accum"]
    micro, per_epoch, total = plan["micro_batches_per_epoch"], plan["steps_per_epoch"], plan["total_steps"]
    say("derivation (S2: one accumulation rule, shared by the schedule and the loop)")
    say(f"  samples          {n}  ({source})")
    say(f"  micro-batches    ceil({n} / (batch_size {b} x world_size {w})) = {micro} per epoch")
    say(f"  optimizer steps  ceil({micro} / grad_accum {a}) = {per_epoch} per epoch (a short last group steps once, "
        "G1)")
    if cfg["train.max_steps"] is not None:
        say(f"  total            train.max_steps = {total} optimizer steps ({plan['epochs']} epoch(s) started)")
    else:
        say(f"  total            {per_epoch} x {plan['epochs']} epochs = {total} optimizer steps")
    warm = cfg["schedule.warmup"]
    if not warmup_known:
        say(f"  warmup           schedule.warmup {warm:g}: not usable, see the failed check")
        return
    how = f"schedule.warmup {warm:g} x {total}, rounded" if warm < 1 else "schedule.warmup, given in optimizer steps,"
    say(f"  warmup           {how} = {plan['warmup_steps']} optimizer steps ({plan['warmup_steps'] / total:.1%} of "
        "the run)")


# -----------------------------------------------------------------------------
# The curve, the resumed curve and the checks.
def simulate(script, cfg, plan, resume_at):
    """(curve, resumed curve, failures): the real torch scheduler through every optimizer step, once
    uninterrupted and once with a state_dict save/load after step resume_at."""
    failures = []
    try:
        curve = script.lr_curve(cfg, plan)
        resumed = script.lr_curve(cfg, plan, resume_at=resume_at)
    except ValueError as err:
        if "Tried to step" not in str(err):
            raise
        # S7: training steps the scheduler after every optimizer step, the last one included
        return None, None, [("S7", f"the scheduler cannot be stepped through the run's {plan['total_steps']} "
                                   f"optimizer steps: torch says \"{err}\"")]
    failures += script.check_lr_curve(curve, cfg, plan)  # S10 sanity, S5 expect: block
    if len(resumed) != len(curve) or not np.array_equal(curve, resumed):
        diff = np.flatnonzero(curve != resumed) if len(resumed) == len(curve) else [min(len(curve), len(resumed))]
        j = int(diff[0])
        got = f"{resumed[j]:.6g}" if j < len(resumed) else "nothing"
        failures.append(("R3", f"resuming after step {resume_at} changes the curve from step {j + 1}: "
                               f"uninterrupted {curve[j]:.6g}, resumed {got}"))  # R3: state_dict round trip
    return curve, resumed, failures


def print_checks(say, plan, resume_at, failures, cfg, ran_curve):
    """One line per check: ok, or FAIL with the row id and the reason."""
    say("checks")
    by_row = {}
    for rid, msg in failures:
        by_row.setdefault(rid, []).append(msg)
    total = plan["total_steps"] if plan else "?"
    passes = [("S2", "step counts derived from the data, none hand-typed"
               + (f" ({total} optimizer steps)" if plan else "")),
              ("S3", (f"warmup {plan['warmup_steps']} optimizer steps" if plan else "warmup")
               + " shorter than the run")]
    if ran_curve or "S7" in by_row:
        passes.append(("S7", f"the scheduler steps through all {total} optimizer steps without passing its total"))
    if ran_curve:
        has_expect = any(cfg[k] is not None for k in ("expect.initial_lr", "expect.peak_lr", "expect.final_lr"))
        passes += [("S10", "step 1 LR, rise through warmup, peak, floor, no zero LR, no frozen stretch"),
                   ("S5", "the expect: block matches what torch produces" if has_expect
                          else "no expect: block in the config (add one to pin the LR you expect)"),
                   ("R3", f"save/restore of the scheduler after step {resume_at}: the curve continues exactly")]
    for rid, what in passes:
        if rid not in by_row:
            say(f"  ok   {rid:<4} {what}")
    for rid, msg in failures:
        say(f"  FAIL {rid:<4} {msg}")


# -----------------------------------------------------------------------------
# Presentation: landmark table, ASCII plot, lr.csv, lr.png.
def print_table(say, curve, plan, marks, cfg):
    total = len(curve)
    peak_step = int(np.argmax(curve)) + 1
    rows = [("step 1", 1, f"initial {marks['initial']:.6g}", cfg["expect.initial_lr"])]
    if plan["warmup_steps"] >= 1:
        rows.append(("end of warmup", plan["warmup_steps"], "", None))
    rows.append(("peak", peak_step, f"peak {marks['peak']:.6g} at step {marks['peak_step']}", cfg["expect.peak_lr"]))
    for pct in (25, 50, 75):
        rows.append((f"{pct}% of the run", max(1, math.ceil(pct * total / 100)), "", None))
    rows.append(("100% = final step", total, f"floor {marks['final']:.6g}", cfg["expect.final_lr"]))
    say(f"{'point':<18} {'step':>9}  {'lr (torch)':<13} {'schedule says':<32} expect:")
    for name, step, says, want in rows:
        say(f"{name:<18} {step:>9}  {curve[step - 1]:<13.6g} {says:<32} {'' if want is None else f'{want:.6g}'}")


def ascii_plot(curve, width=PLOT_WIDTH, height=PLOT_HEIGHT):
    """LR (linear, 0..peak) against optimizer step; a column spans steps and draws their min..max."""
    total, top = len(curve), float(curve.max())
    grid = [[" "] * width for _ in range(height)]
    for col in range(width):
        lo = col * total // width
        hi = max(lo + 1, (col + 1) * total // width)
        seg = curve[lo:hi]
        r_lo, r_hi = (int(round(v / top * (height - 1))) if top > 0 else 0 for v in (seg.min(), seg.max()))
        for r in range(r_lo, r_hi + 1):
            grid[height - 1 - r][col] = "*"
    lines = []
    for i, row in enumerate(grid):
        label = f"{top:.3g}" if i == 0 else ("0" if i == height - 1 else "")
        lines.append(f"{label:>9} |{''.join(row)}")
    lines.append(" " * 10 + "+" + "-" * width)
    lines.append(" " * 11 + "1" + f"optimizer step {total}".rjust(width - 1))
    return "\n".join(lines)


def write_text_atomic(path, text):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_csv(path, curve):
    """step,lr: 1-based optimizer step and the LR it used; repr() round-trips the float exactly, as the
    json in metrics.jsonl does, so the two files compare with ==."""
    lines = [f"{step},{lr!r}" for step, lr in enumerate(curve.tolist(), start=1)]
    write_text_atomic(path, "step,lr\n" + "\n".join(lines) + "\n")


def write_png(path, curve, plan, resume_at, title):
    """Optional: only when matplotlib is importable. Returns False when it is not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(np.arange(1, len(curve) + 1), curve, lw=1.2)
    if plan["warmup_steps"] >= 1:
        ax.axvline(plan["warmup_steps"], color="grey", ls=":", label=f"end of warmup ({plan['warmup_steps']})")
    ax.axvline(resume_at, color="tab:red", ls="--", lw=0.8, label=f"resume check ({resume_at})")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title=title)
    ax.legend(loc="best")
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# -----------------------------------------------------------------------------
def run(args):
    """The tool, in the order it runs. Returns the exit code; raises BadInput for exit 2."""
    start = time.perf_counter()
    task = configured_task(args.config, args.set)
    script = load_script(task)
    say = script.write_stdout  # R8: `... | head` ends without a traceback, after every check and file, with their code
    try:
        cfg, notes = script.resolve_config(args.config, args.set, check_files=False)  # data may live elsewhere
        num_samples, source = dataset_size(script, cfg, args.num_samples)  # C3: a file the script refuses: its line
    except script.ConfigError as err:
        raise BadInput(str(err)) from None
    plan, failures, shown = plan_or_failures(script, cfg, num_samples, args.world_size)
    if plan is not None:  # every input is validated before anything is printed or written
        total = plan["total_steps"]
        resume_at = total // 2 if args.resume_at is None else args.resume_at
        if not 1 <= resume_at < total:
            raise BadInput(f"--resume_at: {resume_at} must be between 1 and {total - 1} (the run has {total} optimizer "
                           "steps)")
    out = args.out or os.path.join("runs", cfg["run_name"], "schedule")
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out: {out} exists and is not a directory; give a directory for lr.csv")
    say(f"schedule dry run of {args.config} (task {cfg['task']} -> {script.__name__}.py, "
        f"schedule.type {cfg['schedule.type']}, optim.lr {cfg['optim.lr']:g})")
    for rid, key, msg in notes:
        say(f"note {rid}: {key}: {msg}")
    if shown is not None:
        print_derivation(say, cfg, shown, source, warmup_known="S3" not in dict(failures))
    if failures:  # S2/S3: the curve training would run cannot be built from this config
        print_checks(say, plan, None, failures, cfg, ran_curve=False)
        say(f"schedule dry run FAILED ({len(failures)} problem(s)); nothing written")
        return 1
    warm_share = plan["warmup_steps"] / total
    if plan["warmup_steps"] >= 2 and not 0.05 <= warm_share <= 0.30:
        say(f"note S3: warmup is {warm_share:.1%} of the run; 5-30% is the sane band for most jobs")
    curve, _, failures = simulate(script, cfg, plan, resume_at)
    if curve is None:
        print_checks(say, plan, resume_at, failures, cfg, ran_curve=False)
        say(f"schedule dry run FAILED ({len(failures)} problem(s)); nothing written")
        return 1
    marks = script.schedule_landmarks(cfg, plan)
    say(f"schedule: {cfg['schedule.type']}, LR {curve[0]:.4g} at step 1 -> peak {curve.max():.4g} at step "
        f"{int(np.argmax(curve)) + 1} -> {curve[-1]:.4g} at step {total}")
    print_table(say, curve, plan, marks, cfg)
    say(ascii_plot(curve))
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "lr.csv"), curve)
    title = f"{os.path.basename(args.config)}: {cfg['schedule.type']}, {total} optimizer steps"
    png = write_png(os.path.join(out, "lr.png"), curve, plan, resume_at, title)
    say(f"wrote {os.path.join(out, 'lr.csv')}" + (f" and {os.path.join(out, 'lr.png')}" if png
                                                 else " (lr.png skipped: matplotlib is not installed for "
                                                 f"{sys.executable})"))
    print_checks(say, plan, resume_at, failures, cfg, ran_curve=True)
    elapsed = time.perf_counter() - start
    if failures:
        say(f"schedule dry run FAILED ({len(failures)} problem(s)) in {elapsed:.1f} s")
        return 1
    say(f"schedule dry run passed: {total} optimizer steps simulated twice in {elapsed:.1f} s")
    return 0


def main(argv=None):
    try:
        return run(parse_args(argv))
    except BadInput as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
