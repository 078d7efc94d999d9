"""Tables, per-slice CSV and figures of an evaluation (Table 1, Figures 5 and 6 of the paper).

Every file is written atomically (a temporary name in the same folder, then a rename).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_write

CSV_COLUMNS = ("label", "sr_slice", "hr_slice_start", "hr_slice_stop", "psnr", "ssim", "niqe",
               "ma", "pi")
TABLE_HEADER = ("Method", "Scale", "PSNR (dB)", "SSIM", "NIQE", "Ma", "PI", "BV/TV err",
                "Tb.Th err")


def _pm(stat: dict[str, float] | None, digits: int) -> str:
    if not stat:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _rel(morph: dict[str, Any] | None, key: str) -> str:
    rel = morph[key]["rel_error"] if morph else None
    return "n/a" if rel is None else f"{100 * rel:+.1f}%"


def _md_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (``|`` escaped)."""
    return text.replace("|", r"\|")


def table_row(label: str, summary: dict[str, Any], scale: str = "x8") -> list[str]:
    """One Table-1 row from an evaluation summary (Markdown cells)."""
    m = summary.get("morphometry")
    return [_md_cell(label), scale, _pm(summary.get("psnr"), 2), _pm(summary.get("ssim"), 4),
            _pm(summary.get("niqe"), 2), _pm(summary.get("ma"), 2), _pm(summary.get("pi"), 2),
            _rel(m, "bv_tv"), _rel(m, "tb_th_um")]


def format_table(results: Sequence[Any]) -> str:
    """A Markdown table, one row per :class:`~microct_sr.metrics.EvalResult`. A metric column
    that is n/a for every method (not asked for, or not computable here) is left out and
    named in a line below the table."""
    rows = [table_row(r.label, r.summary) for r in results]
    shown = [i for i in range(len(TABLE_HEADER))
             if i < 2 or any(row[i] != "n/a" for row in rows)]
    rows = [[TABLE_HEADER[i] for i in shown]] + [[row[i] for i in shown] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(shown))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    left_out = [h for i, h in enumerate(TABLE_HEADER) if i not in shown]
    if left_out:
        lines += ["", f"Not computed: {', '.join(left_out)}."]
    return "\n".join(lines) + "\n"


def format_report(results: Sequence[Any]) -> str:
    """The table followed by the notes of each method (notes shared by all printed once)."""
    out = [format_table(results)]
    seen: set[str] = set()
    for r in results:
        for note in r.summary.get("notes", []):
            if note not in seen:
                seen.add(note)
                out.append(f"- {note}")
    return "\n".join(out) + "\n"


def write_text(path: str | Path, text: str, replace: bool = True) -> Path:
    """Write ``text`` atomically (``replace=False``: never over an existing file)."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), replace)


def write_csv(path: str | Path, results: Sequence[Any], replace: bool = True) -> Path:
    """Per-slice CSV of every method (NIQE/Ma/PI: mean of the crops on that slice, if any)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        for row in r.rows:
            w.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    return write_text(path, buf.getvalue(), replace)


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def plot(path: str | Path, results: Sequence[Any], replace: bool = True) -> Path:
    """PSNR-PI plane (PSNR-NIQE when Ma is unavailable; Figure 6) and per-slice box plots of
    PSNR and SSIM (Figure 5), one figure, saved atomically (format from the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    perceptual = "pi" if any(r.summary.get("pi") for r in results) else "niqe"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for r in results:
        p, q = r.summary.get("psnr"), r.summary.get(perceptual)
        if p and q:
            ax.errorbar(q["mean"], p["mean"], xerr=q["std"], yerr=p["std"], fmt="o", capsize=3,
                        label=r.label)
            ax.annotate(r.label, (q["mean"], p["mean"]), textcoords="offset points",
                        xytext=(5, 5))
    ax.set_xlabel(f"{perceptual.upper()} (lower is better)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"PSNR-{perceptual.upper()} plane")
    if not ax.has_data():
        ax.text(0.5, 0.5, f"PSNR or {perceptual.upper()} unavailable", ha="center",
                va="center", transform=ax.transAxes)
    for ax, name, unit in ((axes[1], "psnr", "PSNR (dB)"), (axes[2], "ssim", "SSIM")):
        data = [[v for v in r.values.get(name, []) if v is not None and v == v and
                 abs(v) != float("inf")] for r in results]
        if any(data):
            ax.boxplot(data, tick_labels=[r.label for r in results])
        ax.set_ylabel(unit)
        ax.set_title(f"{unit.split()[0]} per slice")
    fig.tight_layout()
    suffix = Path(path).suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda p: fig.savefig(p, dpi=120, format=suffix), replace)
    finally:
        plt.close(fig)
