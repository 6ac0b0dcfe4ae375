"""--plot for diagnose_and_fix.py: what the run(s) did, on one axis of optimizer steps, with the log findings
marked where they are (docs/plots.md). A PNG (svg, pdf) with matplotlib (optional), ASCII panels without it
or with `--plot -`.

A companion file of the tool: diagnose_and_fix.py loads it (plotting()) when --plot is given, from its own
directory, and hands itself over as `kit`; this file reads logs and refuses through the tool's own read_log()
and UsageError.
"""
import io
import math
import os
import sys
import tempfile
import types

import numpy as np

kit: types.ModuleType  # diagnose_and_fix.py, which loaded this file: plotting() sets it before this code runs


PLOT_PANELS = ("loss", "val", "lr", "grad_norm", "throughput")
PLOT_TITLES = {"loss": "train loss, val/loss (o); with loss/<name> terms (broken lines): train CE beside val/loss, "
                       "the weighted sum faint",
               "val": "val metrics (val/ppl = exp(val/loss) is left out)",
               "lr": "learning rate: logged (points, at the logged steps) over the config's lr_curve (wide, light)",
               "grad_norm": "gradient norm (before clipping), train.clip_grad_norm (dotted)",
               "throughput": "throughput"}
FINDING_PANEL = {"S1": "lr", "S2": "lr", "S9": "lr", "E1": "val", "E3": "val", "G3": "grad_norm", "G4": "grad_norm",
                 "G5": "grad_norm", "E7": "throughput"}  # any other row (S10, E2): the loss panel
EVENT_LABELS = {"resume": "resume", "stopped": "stop", "early_stopped": "early stop"}  # "finished" is not marked
PLOT_INCHES, PLOT_DPI = (11.0, 13.0), 100  # every PNG is 1100 x 1300 pixels, whatever it shows
PLOT_FORMATS = ("png", "svg", "pdf")
ASCII_WIDTH, ASCII_HEIGHT = 64, 8
RUN_CHARS = "*o+#%@&$"  # the ASCII character of each run's main line, in --log order
RUN_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f", "#bcbd22", "#e377c2")
SEVERITY_COLORS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}


def check_plot_inputs(logs, out):
    """--plot's bad input is a usage error (one line, exit 2), found before anything is printed or written."""
    if not logs:
        raise kit.UsageError("--plot draws runs: name their metrics.jsonl with --log")
    for log in logs:
        if not os.path.isfile(log):
            raise kit.UsageError(f"--log {log}: no such file; give a run's metrics.jsonl "
                                 "(runs/<run_name>/metrics.jsonl)")
        try:
            train, evals, info = kit.read_log(log)
        except OSError as err:
            raise kit.UsageError(f"--log {log}: cannot be read ({err.strerror or err})") from None
        if not train and not evals:
            raise kit.UsageError(f"--log {log}: no record with a step in its {info['lines']} line(s) "
                             f"({len(info['bad_lines'])} unparsable): not a metrics.jsonl nor a step= text log")
    if out == "-":
        return
    if os.path.splitext(out)[1].lower().lstrip(".") not in PLOT_FORMATS:
        raise kit.UsageError(f"--plot {out}: name a .png, .svg or .pdf file, or '-' for ASCII panels on stdout")
    if os.path.isdir(out):
        raise kit.UsageError(f"--plot {out}: is a directory; name the image file, e.g. {os.path.join(out, 'runs.png')}")
    directory = os.path.dirname(os.path.abspath(out))
    try:  # the one sure test of writability (os.access says yes to root on a read-only mount)
        fd, trial = tempfile.mkstemp(dir=directory, prefix=".plot-")
        os.close(fd)
        os.unlink(trial)
    except OSError as err:
        raise kit.UsageError(f"--plot {out}: cannot write in {directory} ({err.strerror or err}); name a file in a "
                         "writable directory") from None


def plot_markers(findings, train, events):
    """What --plot marks on a run, in drawing order: every log finding that names its steps (row id, severity,
    panel, the finding's own step spans), then resumes, stops, early stops and skipped (non-kit.finite) steps."""
    marks = [{"label": f["id"], "kind": "finding", "severity": f["severity"],
              "panel": FINDING_PANEL.get(f["id"], "loss"),
              "spans": list(f["at"])} for f in findings if f["source"] == "log" and f["at"]]
    for event, step in events:
        if event in EVENT_LABELS:
            marks.append({"label": EVENT_LABELS[event], "kind": event, "severity": "info", "panel": None,
                          "spans": [(step, step)]})
    # G4/G5: the kit logs every step whose loss or gradient norm was not kit.finite, and skips it
    skipped = [s for s in sorted(train) if not (kit.finite(train[s].get("loss", 0.0))
                                                and kit.finite(train[s].get("grad_norm", 0.0)))]
    if skipped:
        marks.append({"label": "skipped", "kind": "skipped", "severity": "info", "panel": None,
                      "spans": [(s, s) for s in skipped]})
    return marks


def panel_series(train, evals, cfg, curve):
    """{panel: [(label, steps, values, style)]}: the one list of what is drawn, for the PNG and the ASCII panels."""
    steps, eval_steps = sorted(train), sorted(evals)

    def column(key, among, records):
        xs = [s for s in among if key in records[s]]
        return xs, [records[s][key] for s in xs]

    series = {panel: [] for panel in PLOT_PANELS}
    components = sorted({k for s in steps for k in train[s] if k.startswith("loss/")})
    alpha = cfg.get("kd.alpha")
    if components:  # like with like: val/loss is the label CE, the train loss a weighted sum of terms
        series["loss"].append(("train loss (weighted sum)", *column("loss", steps, train), "sum"))
        if "loss/ce" in components and alpha:
            xs, ys = column("loss/ce", steps, train)
            series["loss"].append(("train CE (loss/ce / kd.alpha)", xs,
                                   [y / alpha if kit.finite(y) else y for y in ys], "line"))
    else:
        series["loss"].append(("train loss", *column("loss", steps, train), "line"))
    for key in components:
        series["loss"].append((key, *column(key, steps, train), "component"))
    series["loss"].append(("val/loss", *column("val/loss", eval_steps, evals), "points"))
    names = {k for s in eval_steps for k in evals[s]} - {"val/loss"}
    names -= {"val/ppl"} if series["loss"][-1][1] else set()
    for key in sorted(names):
        series["val"].append((key, *column(key, eval_steps, evals), "points"))
    if curve is not None:  # the training script's own lr_curve for the run's saved config.yaml
        series["lr"].append(("configured LR", list(range(1, len(curve) + 1)), [float(v) for v in curve], "behind"))
    series["lr"].append(("logged LR", *column("lr", steps, train), "logged"))  # points: nothing between logged steps
    series["grad_norm"].append(("grad norm", *column("grad_norm", steps, train), "line"))
    if cfg.get("train.clip_grad_norm") and steps:
        clip, last = cfg["train.clip_grad_norm"], max(steps[-1], len(curve) if curve is not None else 0)
        series["grad_norm"].append((f"clip {clip:g}", [1, last], [clip, clip], "threshold"))
    rates = sorted({k for s in steps for k in train[s] if k.endswith("_per_s")})
    rate = next((k for k in rates if k != "samples_per_s"), rates[0] if rates else None)  # tokens/s for an LM
    if rate:
        series["throughput"].append((rate, *column(rate, steps, train), "line"))
    return {panel: [item for item in items if item[1]] for panel, items in series.items()}


def run_view(log, report, findings):
    """Everything --plot draws of one run: records, configured curve, clip threshold, markers."""
    train, evals, info = kit.read_log(log)
    cfg = report["cfg"] or {}
    return {"log": log, "name": os.path.basename(os.path.dirname(os.path.abspath(log))) or log,
            "series": panel_series(train, evals, cfg, report["curve"]),
            "markers": plot_markers(findings, train, info["events"]),
            "findings": [f for f in findings if f["source"] == "log" and f["severity"] != "info"],
            "curve_note": None if report["curve"] is not None else
            "no configured LR curve (no config.yaml beside the log, or its run length is unknown: see the findings)"}


def last_step(views):
    return max([1] + [max(xs) for v in views for items in v["series"].values() for _, xs, _, _ in items])


def loss_top(views):
    """The loss panel's top when the first steps would flatten the rest: a start-up loss several times the
    later ones leaves every later difference (val/loss of runs compared side by side) a few pixels. Clipped
    to 1.15x the largest value after the first 10% of the steps when the earlier ones exceed twice that;
    else None (no clipping). Each run's 10% is of its own logged steps: a short (killed) run beside a long one,
    or a configured LR curve longer than the log, would otherwise count as start-up and vanish above the top."""
    values = []
    for v in views:
        curves = [(xs, ys) for _, xs, ys, _ in v["series"]["loss"]]
        cut = 0.1 * max([1] + [max(xs) for xs, _ in curves if xs])
        values += [(x < cut, y) for xs, ys in curves for x, y in zip(xs, ys) if kit.finite(y)]
    early, late = [y for e, y in values if e], [y for e, y in values if not e]
    return 1.15 * max(late) if early and late and max(early) > 2 * max(late) else None


def loss_bottom(views, top):
    """The loss panel's bottom: 5% of the shown range under the lowest value, never under 0 when no value is
    negative (matplotlib's margin, sized by the clipped start-up values too, put a positive loss at -0.27)."""
    values = [y for v in views for _, _, ys, _ in v["series"]["loss"] for y in ys if kit.finite(y)]
    if not values:
        return None
    low = min(values)
    bottom = low - 0.05 * ((top if top is not None else max(values)) - low)
    return bottom if low < 0 else max(0.0, bottom)


def fitted_title(fig, ax, text):
    """The panel's title in the largest font from 9 down to 7 points that fits inside the figure (the loss
    panel's, with its clipping note, ran off the right edge at 9); past that, two lines rather than a cut."""
    renderer = fig.canvas.get_renderer()
    for size in (9, 8.5, 8, 7.5, 7):
        title = ax.set_title(text, loc="left", fontsize=size)
        if title.get_window_extent(renderer).x1 <= fig.bbox.x1:
            return title
    head, _, tail = text.rpartition("; ")
    return ax.set_title(f"{head};\n{tail}" if head else text, loc="left", fontsize=7)


def spans_text(spans):
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:4])
    return shown + (f" (+{len(spans) - 4} more)" if len(spans) > 4 else "")


def marks_summary(view):
    parts = [f"{m['label']} at {spans_text(m['spans'])}" for m in view["markers"]]
    return f"{view['name']}: " + ("; ".join(parts) if parts else "nothing to mark")


def build_figure(views):
    """The picture as a matplotlib figure: five panels sharing the step axis, the findings listed under
    them. Returns (figure, {panel: axes}, the run legend); draw_png writes it."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed (ssh, CI)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig = plt.figure(figsize=PLOT_INCHES, dpi=PLOT_DPI)
    grid = fig.add_gridspec(len(PLOT_PANELS) + 1, 1, height_ratios=(3, 1.6, 2, 2, 1.4, 1.3), left=0.075,
                            right=0.985, top=0.94, bottom=0.01, hspace=0.22)
    axes = {}
    for i, panel in enumerate(PLOT_PANELS):
        axes[panel] = fig.add_subplot(grid[i], sharex=axes.get("loss"))
        axes[panel].set_title(PLOT_TITLES[panel], loc="left", fontsize=9)
        axes[panel].tick_params(labelsize=8, labelbottom=panel == PLOT_PANELS[-1])
        axes[panel].grid(alpha=0.25)
    axes[PLOT_PANELS[-1]].set_xlabel("optimizer step", fontsize=9)
    legends = {panel: {} for panel in PLOT_PANELS}
    labelled = {p: 0 for p in PLOT_PANELS}  # over all runs: a second run's labels go below the first's
    for k, view in enumerate(views):
        color = RUN_COLORS[k % len(RUN_COLORS)]
        draw_series(axes, view, color, legends)
        draw_markers(axes, view, color, legends, labelled, len(views))
    finish_panels(fig, axes, legends, views)
    legend = fig.legend([Line2D([], [], color=RUN_COLORS[k % len(RUN_COLORS)], lw=2.5) for k in range(len(views))],
               [f"{v['name']} ({v['log']})" for v in views], loc="upper center", ncol=min(len(views), 3),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, 0.985))
    return fig, axes, legend


def draw_series(axes, view, color, legends):
    """One run's logged series on their panels, in the run's colour; each style once in the panel's legend."""
    from matplotlib.lines import Line2D
    styles, shapes = ["--", ":", "-."], ["o", "s", "^", "D", "v"]
    for panel, items in view["series"].items():
        ax, n_comp, n_val = axes[panel], 0, 0
        for label, xs, ys, style in items:
            kw = {"line": dict(lw=1.2), "behind": dict(lw=6, alpha=0.22, solid_capstyle="butt"),
                  "threshold": dict(lw=1.2, ls=":"), "sum": dict(lw=1.0, alpha=0.4),
                  "logged": dict(ls="none", marker=".", ms=4)}.get(style)
            if style == "component":
                kw, n_comp = dict(lw=1.0, ls=styles[n_comp % len(styles)]), n_comp + 1
            elif style == "points":
                kw, n_val = dict(lw=0.7, marker=shapes[n_val % len(shapes)], ms=4), n_val + 1
            ax.plot(xs, ys, color=color, **kw)
            legends[panel].setdefault(label, Line2D([], [], color="0.35", **kw))


def draw_markers(axes, view, color, legends, labelled, n_views):
    """One run's skipped steps, resume/stop lines and findings (shaded spans labelled with the row id)."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import blended_transform_factory
    trans = {p: blended_transform_factory(axes[p].transData, axes[p].transAxes) for p in PLOT_PANELS}
    for mark in view["markers"]:
        spans = mark["spans"]
        if mark["kind"] == "skipped":
            for p in ("loss", "grad_norm"):
                axes[p].plot([a for a, _ in spans], [0.04] * len(spans), "x", color="#d62728", ms=6, mew=1.5,
                             transform=trans[p], clip_on=False)
                legends[p].setdefault("skipped step", Line2D([], [], color="#d62728", marker="x", ls=""))
            continue
        if mark["kind"] != "finding":  # resume / stop / early stop: a line across every panel
            ls = {"resume": "--", "stopped": ":", "early_stopped": "-"}[mark["kind"]]
            for p in PLOT_PANELS:
                axes[p].axvline(spans[0][0], color="black", ls=ls, lw=1.1, alpha=0.8)
            axes["loss"].text(spans[0][0], 0.97 - 0.1 * labelled["loss"], f" {mark['label']} ({view['name']})"
                              if n_views > 1 else f" {mark['label']}", transform=trans["loss"], fontsize=8,
                              va="top", color=color)
            labelled["loss"] += 1
            continue
        ax, shade = axes[mark["panel"]], SEVERITY_COLORS[mark["severity"]]
        # E2 is about the loss terms drawn there: a band along the panel's foot, not a veil over them
        foot = dict(ymin=0, ymax=0.06, alpha=0.5) if mark["label"] == "E2" else dict(alpha=0.13)
        for a, b in spans:
            if a == b:
                ax.axvline(a, color=shade, lw=0.9, **({"ymax": 0.06} if "ymax" in foot else {"alpha": 0.75}))
            else:
                ax.axvspan(a - 0.5, b + 0.5, color=shade, lw=0, **foot)
        ax.text(spans[0][0], 0.96 - 0.13 * (labelled[mark["panel"]] % 6), mark["label"], transform=trans[mark["panel"]],
                fontsize=8, fontweight="bold", va="top", color=shade, gid=f"finding {mark['label']} {view['name']}",
                bbox=dict(boxstyle="square,pad=0.1", fc="white", ec=color, lw=1, alpha=0.85))
        labelled[mark["panel"]] += 1


def finish_panels(fig, axes, legends, views):
    """The loss panel's clip and the shared step range, empty panels said, log scale for spiky gradient norms,
    each panel's legend."""
    top = loss_top(views)
    axes["loss"].set_ylim(loss_bottom(views, top), top)  # None: that side as matplotlib scales it
    if top is not None:
        fitted_title(fig, axes["loss"], PLOT_TITLES["loss"] + f"; y clipped at {top:.3g} (the first steps are higher)")
    axes["loss"].set_xlim(0, last_step(views) * 1.01 + 1)  # before the legends: the labels' places depend on it
    for panel, ax in axes.items():
        if not ax.lines:
            ax.text(0.5, 0.5, "not in the log", transform=ax.transAxes, ha="center", va="center", color="0.5")
        if panel == "lr":
            ax.set_ylim(bottom=0)
        if panel == "grad_norm":
            values = [y for line in ax.lines for y in np.asarray(line.get_ydata(), float) if np.isfinite(y) and y > 0]
            if values and max(values) > 100 * min(values):  # spikes and the clip line both stay readable
                ax.set_yscale("log")
        if legends[panel]:
            place_legend(fig, ax, legends[panel])


def place_legend(fig, ax, entries):
    """The panel's legend in the first corner where it hides none of the finding labels drawn there (an E7
    label near the last steps sat under an upper-right legend)."""
    labels = [t for t in ax.texts if (t.get_gid() or "").startswith("finding")]
    renderer = fig.canvas.get_renderer()
    for loc in ("upper right", "upper left", "lower right", "lower left", "center right", "center left"):
        legend = ax.legend(entries.values(), entries.keys(), fontsize=7, loc=loc, framealpha=0.8)
        box = legend.get_window_extent(renderer)
        if not any(box.overlaps(t.get_window_extent(renderer)) for t in labels):
            return legend
    return ax.legend(entries.values(), entries.keys(), fontsize=7, loc="upper right", framealpha=0.8)


def draw_png(views, path):
    """build_figure's picture, with the findings listed under the panels, written atomically. Returns the
    run legend's labels as drawn."""
    import matplotlib.pyplot as plt
    fig, _, legend = build_figure(views)
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    lines = []
    for v in views:
        lines += [f"{v['name']}: {f['severity'].upper()} {f['id']}: {f['evidence']}" for f in v["findings"]]
        lines += [f"{v['name']}: {v['curve_note']}"] if v["curve_note"] else []
    if not lines:
        lines = ["no critical or warning log findings"]
    more = len(lines) - 9
    lines = [line if len(line) <= 160 else line[:157] + "..." for line in lines[:9]]
    lines += [f"... {more} more: run diagnose_and_fix.py --log for all of them"] if more > 0 else []
    note = fig.add_subplot(grid[-1])
    note.axis("off")
    note.text(0, 0.8, "\n".join(lines), va="top", ha="left", fontsize=7.5, family="monospace", transform=note.transAxes)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".plot-{os.getpid()}-{os.path.basename(path)}")
    try:
        if path.lower().endswith(".png"):  # a 256-colour palette (pillow comes with matplotlib): a third of the
            from PIL import Image         # bytes, and the few colours of line plots stay exact (fast octree)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=PLOT_DPI)  # never bbox_inches="tight": the pixel size is fixed
            Image.open(buffer).convert("RGB").quantize(256, method=2).save(tmp, format="PNG", optimize=True)
        else:
            fig.savefig(tmp, dpi=PLOT_DPI)
        os.replace(tmp, path)
    except OSError as err:
        raise kit.UsageError(f"--plot {path}: cannot write ({err.strerror or err})") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return [text.get_text() for text in legend.get_texts()]


def ascii_chart(series, x_last, log_y=False, top=None, width=ASCII_WIDTH, height=ASCII_HEIGHT):
    """Text rows of [(char, steps, values, joined)] drawn in order, later ones on top. As in
    test_scheduler_dry_run.py's LR plot, a column covering several steps draws the min..max of its
    values; a joined series is also filled in linearly between its logged steps. Values above `top` are
    drawn on the top row."""
    def tf(v):
        v = v if top is None else min(v, top)
        return math.log10(v) if log_y else v
    pts = [[(x, y) for x, y in zip(xs, ys) if kit.finite(y) and (y > 0 or not log_y)] for _, xs, ys, _ in series]
    values = [tf(y) for p in pts for _, y in p]
    if not values:
        return [f"{'':>9} |(not in the log)"]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - max(abs(lo), 1.0) * 0.1, hi + max(abs(hi), 1.0) * 0.1

    def col(x):
        return min(width - 1, max(0, int(round((x - 1) / max(x_last - 1, 1) * (width - 1)))))

    def row(v):
        return int(round((v - lo) / (hi - lo) * (height - 1)))

    grid = [[" "] * width for _ in range(height)]
    for (char, _, _, joined), p in zip(series, pts):
        cells = {}
        for x, y in p:
            cells.setdefault(col(x), []).append(tf(y))
        if joined:  # columns between two logged steps: the straight line between them
            for (x0, y0), (x1, y1) in zip(p, p[1:]):
                for c in range(col(x0) + 1, col(x1)):
                    if c not in cells:
                        t = ((c / (width - 1)) * max(x_last - 1, 1) + 1 - x0) / max(x1 - x0, 1e-12)
                        cells[c] = [tf(y0) + min(max(t, 0), 1) * (tf(y1) - tf(y0))]
        for c, vs in cells.items():
            rows = range(row(min(vs)), row(max(vs)) + 1) if joined else {row(v) for v in vs}
            for r in rows:
                grid[height - 1 - r][c] = char
    shown = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    labels = {0: shown(hi), height - 1: shown(lo),
              (height - 1) // 2: shown(hi - (hi - lo) * ((height - 1) // 2) / (height - 1))}
    return [f"{labels.get(i, ''):>9} |{''.join(r)}" for i, r in enumerate(grid)]


def ascii_marks(markers, panel, x_last, width=ASCII_WIDTH):
    """One text row under a panel: R resume, S stop, E early stop, x skipped step, and this panel's findings:
    ^ at a step, = over a span, the row id written at the first one."""
    line = [" "] * width

    def col(x):
        return min(width - 1, max(0, int(round((x - 1) / max(x_last - 1, 1) * (width - 1)))))
    labels = []
    for mark in markers:
        if mark["kind"] == "finding" and mark["panel"] == panel:
            for a, b in mark["spans"]:
                for c in range(col(a), col(b) + 1):
                    line[c] = "^" if a == b else "="
            labels.append((col(mark["spans"][0][0]), mark["label"]))
        elif mark["kind"] != "finding":
            char = {"resume": "R", "stopped": "S", "early_stopped": "E", "skipped": "x"}[mark["kind"]]
            for a, _ in mark["spans"]:
                line[col(a)] = char
    for c, text in labels:
        c = min(c, width - len(text))
        line[c:c + len(text)] = text
    return "".join(line[:width])


def ascii_panels(views):
    """The terminal version of the PNG: the same panels, series and markers as text."""
    x_last = last_step(views)
    order = {"behind": 0, "threshold": 1, "component": 2, "sum": 3, "line": 3, "logged": 3, "points": 4}
    out = ["runs: " + "   ".join(f"{RUN_CHARS[k % len(RUN_CHARS)]} {v['name']} ({v['log']})"
                                   for k, v in enumerate(views))]
    for panel in PLOT_PANELS:
        pool, drawn, legend = iter("abcdefghijkmnpqrstuvwyz"), [], []
        for k, view in enumerate(views):
            for label, xs, ys, style in view["series"][panel]:
                if style in ("line", "logged") and not (style == "line" and label.startswith("train CE")):
                    char = RUN_CHARS[k % len(RUN_CHARS)]
                elif style in ("behind", "threshold") and len(views) == 1:
                    char = "." if style == "behind" else "-"
                else:
                    char = next(pool, "?")
                drawn.append((order[style], char, xs, ys, style not in ("points", "logged")))
                legend.append(f"{char} {label}" + (f" ({view['name']})" if len(views) > 1 else ""))
        drawn.sort(key=lambda d: d[0])
        values = [y for _, _, _, ys, _ in drawn for y in ys if kit.finite(y) and y > 0]
        log_y = panel == "grad_norm" and bool(values) and max(values) > 100 * min(values)
        top = loss_top(views) if panel == "loss" else None
        out += ["", f"{panel}: {PLOT_TITLES[panel]}" + (" [log scale]" if log_y else "") +
                (f" [clipped at {top:.3g}: the first steps are higher]" if top is not None else "")]
        out += ascii_chart([d[1:] for d in drawn], x_last, log_y, top)
        out.append(" " * 10 + "+" + "-" * ASCII_WIDTH)
        for k, view in enumerate(views):
            marks = ascii_marks(view["markers"], panel, x_last)
            if marks.strip():
                out.append(f"{'marks ' + RUN_CHARS[k % len(RUN_CHARS)]:>9}  {marks}")
        out.append(" " * 11 + "1" + f"optimizer step {x_last}".rjust(ASCII_WIDTH - 1))
        out.append(" " * 11 + "   ".join(legend))
    out += ["", "marks: R resume, S stop, E early stop, x skipped step; a finding: ^ at a step, = over steps, "
            "labelled by its FAILURE_MODES.md row id"]
    for v in views:
        out += [f"  {v['name']}: {f['severity'].upper()} {f['id']}: {f['evidence']}" for f in v["findings"]]
        out += [f"  {v['name']}: {v['curve_note']}"] if v["curve_note"] else []
    return "\n".join(out)


def plot_runs(views, path, out=print):
    """PNG (svg, pdf) at path when matplotlib imports; else, or for path '-', ASCII panels written by `out` (a function
    of one text: the tool's write_stdout, R8). Returns (the kind drawn: "image" or "ascii", the runs' legend labels)."""
    names = [v["name"] for v in views]
    for v in views:  # two runs from directories of the same name: tell them apart by their path
        if names.count(v["name"]) > 1:
            v["name"] = os.path.relpath(os.path.dirname(os.path.abspath(v["log"])))
    if path != "-":
        try:
            import matplotlib  # noqa: F401  (optional: the ASCII panels below need nothing)
        except ImportError:
            matplotlib = None
        if matplotlib is not None:
            legend = draw_png(views, path)
            size = f"{int(PLOT_INCHES[0] * PLOT_DPI)} x {int(PLOT_INCHES[1] * PLOT_DPI)} pixels" \
                if path.lower().endswith(".png") else f"{PLOT_INCHES[0]:g} x {PLOT_INCHES[1]:g} inches"
            out(f"plot: wrote {path} ({size}); marked " + "; ".join(marks_summary(v) for v in views))
            return "image", legend
    text = ascii_panels(views)
    out(text)
    if path != "-":
        print(f"plot: {path} not written: matplotlib is not installed for {sys.executable} ({sys.executable} -m pip "
              "install matplotlib); the ASCII panels show the same", file=sys.stderr)
    return "ascii", text.splitlines()[0].removeprefix("runs: ").split("   ")
