"""Draws each Grafana dashboard's panels as PNG plots from what a real Prometheus returned for
their queries, so a person can look at the dashboards without a Grafana.

Usage: render_dashboards.py DATA.json OUT_DIR

DATA.json is written by the Prometheus test (tests/tests/agent/prometheus.rs): per dashboard,
per panel, per query, the query_range result. One OUT_DIR/<dashboard uid>.png per dashboard.
"""

import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Grafana units -> (scale, axis label) for the plots.
UNITS = {
    "s": (1e3, "ms"),
    "percentunit": (100.0, "%"),
    "bytes": (1 / 2**20, "MiB"),
    "watt": (1.0, "W"),
    "celsius": (1.0, "°C"),
    "hertz": (1e-6, "MHz"),
    "ops": (1.0, "/s"),
    "short": (1.0, ""),
}


def legend(fmt, labels):
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "")
    return text.strip() or ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def points(series):
    xs, ys = [], []
    for t, v in series["values"]:
        v = float(v)
        if math.isfinite(v):
            xs.append(float(t))
            ys.append(v)
    return xs, ys


def heatmap(ax, query, t0):
    """Cumulative `le` buckets as per-bucket rates over time, like Grafana's heatmap."""
    rows = []
    for s in query["series"]:
        le = s["labels"].get("le")
        if le is None:
            continue
        rows.append((math.inf if le == "+Inf" else float(le), dict(map(lambda p: (p[0], float(p[1])), s["values"]))))
    rows.sort(key=lambda r: r[0])
    times = sorted({t for _, vals in rows for t in vals})
    grid, labels, prev = [], [], None
    for le, vals in rows:
        cur = [vals.get(t, 0.0) for t in times]
        grid.append([c - p for c, p in zip(cur, prev)] if prev else cur)
        prev = cur
        labels.append("+Inf" if math.isinf(le) else f"{le * 1e3:g}ms")
    if not grid or not times:
        return
    ax.imshow(grid, aspect="auto", origin="lower", cmap="Oranges", interpolation="nearest",
              extent=(times[0] - t0, times[-1] - t0, -0.5, len(grid) - 0.5))
    step = max(1, len(labels) // 8)
    ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6)


def draw(ax, panel, t0):
    scale, unit = UNITS.get(panel.get("unit") or "", (1.0, ""))
    ax.set_title(panel["title"], fontsize=9)
    if panel["type"] == "heatmap":
        heatmap(ax, panel["queries"][0], t0)
        return
    if panel["type"] == "bargauge":
        names, values = [], []
        for q in panel["queries"]:
            for s in q["series"]:
                _, ys = points(s)
                if ys:
                    names.append(legend(q["legend"], s["labels"]))
                    values.append(ys[-1] * scale)
        ax.barh(names, values, color="tab:orange")
        ax.tick_params(axis="y", labelsize=6)
        ax.set_xlabel(unit, fontsize=7)
        return
    for q in panel["queries"]:
        for s in q["series"][:12]:
            xs, ys = points(s)
            if xs:
                ax.plot([x - t0 for x in xs], [y * scale for y in ys], label=legend(q["legend"], s["labels"]),
                        linewidth=1)
    ax.set_ylabel(unit, fontsize=7)
    ax.set_xlabel("seconds", fontsize=7)
    ax.tick_params(labelsize=6)
    if panel.get("unit") == "s" and "p99" in panel["title"]:
        ax.set_yscale("symlog", linthresh=0.01)
    if ax.lines:
        ax.legend(fontsize=5, loc="upper left", ncol=2)


def main():
    data = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for dash in data["dashboards"]:
        panels = [p for p in dash["panels"] if p["queries"]]
        cols = 3
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.5, rows * 3.2), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            draw(ax, panel, data["start"])
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{dash['title']} (real Prometheus data, synthetic pipeline)", fontsize=12)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        path = out / f"{dash['uid']}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        print(path)


if __name__ == "__main__":
    main()
