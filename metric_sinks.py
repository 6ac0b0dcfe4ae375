"""Metric sinks (E10) for train_probe.py and train_distill.py: TensorBoard, Weights & Biases, MLflow.

A companion file: the training script beside it loads it (companion() in the script's shared config block)
when the config turns a sink on (log.tensorboard, log.wandb, log.mlflow), and hands itself over as `kit`;
this file logs and writes through the script's own log() and atomic_write_text(). A script copied without
this file says so in one line when a sink is asked for, and runs as before when none is.
"""
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
import types

import yaml

kit: types.ModuleType  # the training script that loaded this file: companion() sets it before this code runs


# Metric sinks (E10): TensorBoard, Weights & Biases, MLflow, each optional and imported only when the config
# turns it on. A sink receives every record metrics.jsonl receives (write_metrics), under the same names
# with the optimizer step as its step, and the resolved config as hyperparameters; process 0 only. A sink
# whose backend fails warns once and is off: training never stops for a dashboard.
SINK_PACKAGES = {"log.tensorboard": "tensorboard", "log.wandb": "wandb", "log.mlflow": "mlflow"}


def sink_problems(cfg):
    """E10: a sink whose package this interpreter cannot import is a config error, found before anything is
    written (the run, --dry_run and the tools all resolve the config first)."""
    problems = []
    for key, package in SINK_PACKAGES.items():
        if cfg[key] and importlib.util.find_spec(package) is None:
            off = "false" if key == "log.tensorboard" else "null"
            problems.append(("E10", key, f"{cfg[key]!r} needs the {package} package, which {sys.executable} cannot "
                             f"import; install it ({sys.executable} -m pip install {package}) or set {key}={off}"))
    uri = cfg["log.mlflow"] or ""
    missing = [p for p in ("sqlalchemy", "alembic") if importlib.util.find_spec(p) is None]
    if uri.split(":")[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql") and missing and not problems:
        # E10: mlflow-skinny has no database store without them, and would fail at start-up with a registry error
        problems.append(("E10", "log.mlflow",
                         f"{uri!r} is a database store, which needs {' and '.join(missing)} beside "
                         f"mlflow; {sys.executable} cannot import {'them' if len(missing) > 1 else 'it'}: install "
                         f"mlflow itself ({sys.executable} -m pip install mlflow; mlflow-skinny lacks them) or set "
                         "log.mlflow=null"))
    return problems


def config_params(cfg):
    """The resolved config as flat hyperparameters: numbers, strings and bools as they are, the rest as JSON."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in cfg.items()}


def open_sinks(run):
    """E10: open the sinks the config asks for, once, after resume() has set the step the run continues from.
    A sink that cannot start warns and stays off. <run_dir>/sinks.json keeps the W&B and MLflow run ids:
    a resume continues the same run."""
    run["sinks"] = []
    if not run["dist"]["main"]:  # E10: process 0 only, under torchrun as everywhere else in the kit
        return
    path = os.path.join(run["run_dir"], "sinks.json")
    saved = {}
    if os.path.exists(path):
        with contextlib.suppress(OSError, ValueError):
            with open(path) as f:
                saved = json.load(f)
    for key, opener in (("log.tensorboard", open_tensorboard), ("log.wandb", open_wandb), ("log.mlflow", open_mlflow)):
        if run["cfg"][key]:
            try:
                run["sinks"].append({"key": key, **opener(run, saved.get(key) or {})})
            except Exception as err:  # an unreachable server, a bad project name: the run goes on without it
                kit.log(run,
                    f"WARNING E10: {key} could not start ({type(err).__name__}: {err}); training goes on without it")
    save_sink_state(run)


def save_sink_state(run):
    state = {s["key"]: s["state"] for s in run["sinks"] if "state" in s}
    if state:
        kit.atomic_write_text(os.path.join(run["run_dir"], "sinks.json"), json.dumps(state) + "\n")


def send_to_sinks(run, record):
    """One metrics.jsonl record to every open sink: its finite numbers (metrics.jsonl's nulls are left out)."""
    step = record["step"]
    values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
              and not isinstance(v, bool) and math.isfinite(v)}
    for sink in list(run["sinks"]):
        try:
            sink["send"](step, values)
        except Exception as err:
            sink_failed(run, sink, err)


def sink_failed(run, sink, err):
    run["sinks"].remove(sink)
    kit.log(run, f"WARNING E10: {sink['key']} failed at step {run['state']['global_step']} "
                 f"({type(err).__name__}: {err}); it is off for the rest of this run, training goes on "
                 "(metrics.jsonl has every record)")
    with contextlib.suppress(Exception):
        sink["close"](False)


def close_sinks(run, ok=True):
    """Flush and close every sink (W&B and MLflow mark the run finished, or killed when it stopped early)."""
    for sink in run.pop("sinks", None) or []:
        try:
            sink["close"](ok)
        except Exception as err:
            kit.log(run, f"WARNING E10: {sink['key']} failed to close ({type(err).__name__}: {err})")


def open_tensorboard(run, saved):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    # E10: purge_step drops the events a killed process wrote past the checkpoint this run continues from,
    # so each tag shows every step once
    writer = SummaryWriter(os.path.join(run["run_dir"], "tb"), purge_step=run["state"]["global_step"] + 1)
    for summary in hparams(config_params(run["cfg"]), {}):
        writer.file_writer.add_summary(summary)
    config = yaml.safe_dump(kit.unflatten(run["cfg"]), sort_keys=False)
    writer.add_text("config", "    " + config.replace("\n", "\n    "))
    writer.flush()

    def send(step, values):
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        writer.flush()  # what a kill leaves is on disk for purge_step to drop, and the curves are live

    return {"send": send, "close": lambda ok: writer.close()}


def open_wandb(run, saved):
    import wandb
    cfg = run["cfg"]
    run_id = saved.get("id") or os.urandom(6).hex()  # E10: a resume continues the run it started
    directory = os.environ.get("WANDB_DIR") or run["run_dir"]
    os.makedirs(directory, exist_ok=True)  # W&B warns about a WANDB_DIR that does not exist yet
    wb = wandb.init(project=cfg["log.wandb"], id=run_id, resume="allow", name=cfg["run_name"],
                    config=kit.unflatten(cfg), allow_val_change=True, dir=directory,
                    settings=wandb.Settings(console="off", silent=True))  # train.log has the console
    wb.define_metric("step")
    wb.define_metric("*", step_metric="step")  # the optimizer step is the x axis (a test record's step is earlier)

    def close(ok):
        wb.finish(exit_code=0 if ok else 1)

    # What a SIGKILLed process had handed to W&B but W&B had not yet stored is W&B's to keep or lose (its
    # offline mode loses it): the kit cannot ask, so the resumed run sends what it computes, from the
    # checkpoint's step on, to the same run id.
    return {"send": lambda step, values: wb.log({"step": step, **values}), "close": close, "state": {"id": run_id}}


def mlflow_name(name):
    """E10: a metric's name in MLflow: "/" becomes ".", in every store alike. MLflow's file store keeps a metric
    as a file under its name, so "loss" and "loss/ce" cannot both be held ("Not a directory"); TensorBoard and
    W&B keep the "/" (their panels group by it)."""
    return name.replace("/", ".")


def open_mlflow(run, saved):
    cfg, uri = run["cfg"], run["cfg"]["log.mlflow"]
    if uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked; log.mlflow file:... asks
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import logging
    for name in ("mlflow.store.db.utils", "alembic"):  # a database store's table creation: INFO lines on stderr
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    client = MlflowClient(tracking_uri=uri)
    if saved.get("uri") == uri:  # E10: a resume continues the run it started, without repeating a step it holds
        run_id = saved["run_id"]
        client.update_run(run_id, status="RUNNING")
        sent = {k: max(m.step for m in client.get_metric_history(run_id, k))
                for k in client.get_run(run_id).data.metrics}
    else:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"train_{cfg['task']}"
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        run_id, sent = client.create_run(experiment_id, run_name=cfg["run_name"]).info.run_id, {}
        params = [Param(k, str(v)) for k, v in config_params(cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per call
            client.log_batch(run_id, params=params[start:start + 100])

    def send(step, values):
        """Only past the last step the store holds of a metric: the steps a resumed run repeats after a kill
        are the killed process's, bit-identical to an uninterrupted run's (R1-R5)."""
        now = int(time.time() * 1000)
        new = [Metric(mlflow_name(k), v, now, step) for k, v in values.items() if step > sent.get(mlflow_name(k), -1)]
        if new:
            client.log_batch(run_id, metrics=new)
            sent.update(dict.fromkeys((m.key for m in new), step))

    def close(ok):
        client.set_terminated(run_id, "FINISHED" if ok else "KILLED")

    return {"send": send, "close": close, "state": {"uri": uri, "run_id": run_id}}
