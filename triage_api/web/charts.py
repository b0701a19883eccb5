"""Inline SVG charts for the auditor desk: reliability diagram, time series, bars.

Pure functions from plain data to an SVG string: no I/O, nothing beyond the standard
library. Every chart is an accessible image (``role="img"``, a ``<title>`` and a ``<desc>``
that state the numbers in words), uses the Okabe-Ito colour-blind-safe palette, and can be
read without colour: values are printed, series differ by marker shape, dash or hatching.
Every piece of text is XML-escaped (reason strings come from users and from DICOM headers),
numbers that are not finite (or absurdly large) count as missing, and a chart with nothing to draw says
"No data yet".

The adapters at the end take the exact dicts :func:`triage_api.monitoring.model_metrics`
returns (one entry per model version), either as Python objects or as decoded JSON.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any, Literal
from xml.sax.saxutils import escape

from triage_api.vocab import Tier

Unit = Literal["percent", "number", "seconds", "count"]

# Okabe & Ito (2008): distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9")
ALERT = "#D55E00"  # vermillion, kept for reference lines (alert bounds)
INK = "#1a1a1a"
MUTED = "#555555"
GRID = "#e3e3e3"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
LIMIT = 1e15  # no rate, duration or count we chart comes near this
MARKERS = ("circle", "square", "triangle", "diamond")
DASHES = ("", "7 4", "2 3", "9 3 2 3")

# Characters XML 1.0 forbids (controls other than tab/newline/CR, lone surrogates, U+FFFE/F).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class ReliabilityBin:
    """One risk bin: its edges, how many cases, their mean predicted risk and observed positive rate."""

    low: float
    high: float
    n: int
    mean_risk: float
    observed_rate: float


@dataclass(frozen=True)
class Point:
    """One value of a time series; ``value=None`` is a gap (no data for that window).

    ``low``/``high`` bound a confidence interval (drawn only when both are given);
    ``n`` is the sample size behind the value, shown in the description and tooltip.
    """

    at: date  # a date or a datetime (naive datetimes are read as UTC)
    value: float | None
    low: float | None = None
    high: float | None = None
    n: int | None = None


@dataclass(frozen=True)
class Series:
    """A named time series."""

    label: str
    points: Sequence[Point]


@dataclass(frozen=True)
class Reference:
    """A horizontal reference line, e.g. an alert bound."""

    value: float
    label: str


@dataclass(frozen=True)
class BarRow:
    """One category of a bar chart: one value per series (``None``: no data) and an optional note."""

    label: str
    values: Sequence[float | None]
    note: str = ""


# ---------------------------------------------------------------------------- public charts


def reliability_svg(bins: Sequence[ReliabilityBin], *, ece: float | None, title: str = "Calibration") -> str:
    """Reliability diagram: mean predicted risk against observed positive rate, per risk bin.

    Points sit on the dashed diagonal when the model is calibrated; marker area grows with
    the number of cases in the bin, a strip below shows the counts, and a table beside the
    plot prints every value.

    Args:
        bins: The non-empty risk bins (empty or non-finite bins are left out).
        ece: Expected calibration error, stated in the title; ``None`` when not available.
        title: Chart title; the ECE and the number of cases are appended to it.

    Returns:
        An ``<svg>`` element as a string.
    """
    usable = [
        b
        for b in bins
        if b.n > 0 and all(_finite(v) is not None for v in (b.low, b.high, b.mean_risk, b.observed_rate))
    ]
    if not usable:
        return _empty("reliability", title, "No data yet: no final reads with an AI score in this window.")
    usable.sort(key=lambda b: b.mean_risk)
    total = sum(b.n for b in usable)
    ece_value = _finite(ece)
    ece_text = f"ECE {ece_value:.3f}" if ece_value is not None else "ECE not available"
    full_title = f"{title}: {ece_text}, {total} {_plural(total, 'case')}"
    over = sum(b.observed_rate < b.mean_risk for b in usable)
    under = sum(b.observed_rate > b.mean_risk for b in usable)
    desc = (
        f"Reliability diagram of {total} {_plural(total, 'case')} in {len(usable)} risk "
        f"{_plural(len(usable), 'bin')}; expected calibration error {ece_text.removeprefix('ECE ')}. "
        + "; ".join(
            f"risk {b.low:.1f} to {b.high:.1f}: predicted {_pct(b.mean_risk)}, observed "
            f"{_pct(b.observed_rate)}, {b.n} {_plural(b.n, 'case')}"
            for b in usable
        )
        + f". Observed rate below predicted risk in {over} {_plural(over, 'bin')} (risk over-estimated), "
        f"above it in {under}."
    )

    width, height = 716, 500
    x0, y0, size = 76, 52, 300
    strip_top, strip_height = y0 + size + 16, 56
    x = _Scale(0.0, 1.0, x0, x0 + size)
    y = _Scale(0.0, 1.0, y0 + size, y0)
    body = [_heading(full_title, width)]
    body.append(_rect("plot-area", x0, y0, size, size, fill="none", stroke=MUTED))
    for tick in _ticks(0.0, 1.0):
        body.append(_line(x0, y(tick), x0 + size, y(tick), stroke=GRID, cls="grid"))
        body.append(_text(x0 - 8, y(tick) + 4, _tick_label(tick, "percent"), size=12, anchor="end"))
        body.append(_line(x(tick), strip_top + strip_height, x(tick), strip_top + strip_height + 5, MUTED))
        body.append(
            _text(
                x(tick), strip_top + strip_height + 20, _tick_label(tick, "percent"), size=12, anchor="middle"
            )
        )
    body.append(_text(18, y0 + size / 2, "Observed rate (final read positive)", anchor="middle", rotate=True))
    body.append(
        _text(x0 + size / 2, strip_top + strip_height + 42, "Predicted risk (mean in bin)", anchor="middle")
    )
    body.append(
        f'<line class="diagonal" x1="{_n(x(0))}" y1="{_n(y(0))}" x2="{_n(x(1))}" y2="{_n(y(1))}" '
        f'stroke="{MUTED}" stroke-width="1.5" stroke-dasharray="6 4"/>'
    )
    if len(usable) > 1:
        coords = " ".join(f"{_n(x(b.mean_risk))},{_n(y(b.observed_rate))}" for b in usable)
        body.append(
            f'<polyline class="line" points="{coords}" fill="none" stroke="{PALETTE[0]}" stroke-width="2"/>'
        )
    most = max(b.n for b in usable)
    for b in usable:
        radius = 3.5 + 8.5 * math.sqrt(b.n / most)
        tip = (
            f"Risk {b.low:.1f}–{b.high:.1f}: predicted {_pct(b.mean_risk)}, observed "
            f"{_pct(b.observed_rate)}, {b.n} {_plural(b.n, 'case')}"
        )
        body.append(
            f'<circle class="bin" cx="{_n(x(b.mean_risk))}" cy="{_n(y(b.observed_rate))}" r="{_n(radius)}" '
            f'fill="{PALETTE[0]}" fill-opacity="0.85" stroke="#ffffff" stroke-width="1.5">'
            f"<title>{_esc(tip)}</title></circle>"
        )

    # Count strip: one bar per bin over its risk range, the count printed above it.
    body.append(_text(x0 - 8, strip_top + strip_height / 2 + 4, "Cases", size=12, anchor="end"))
    body.append(_line(x0, strip_top + strip_height, x0 + size, strip_top + strip_height, MUTED))
    for b in usable:
        bar = (strip_height - 16) * b.n / most
        left, right = x(b.low) + 1, x(b.high) - 1
        body.append(
            _rect("count-bar", left, strip_top + strip_height - bar, right - left, bar, fill=PALETTE[4])
        )
        body.append(
            _text((left + right) / 2, strip_top + strip_height - bar - 3, str(b.n), size=12, anchor="middle")
        )

    # The same numbers as a table, so nothing depends on reading positions or colour.
    tx = x0 + size + 40
    columns = (
        (tx, "start", "Risk bin"),
        (tx + 150, "end", "Predicted"),
        (tx + 222, "end", "Observed"),
        (tx + 270, "end", "Cases"),
    )
    for cx, anchor, label in columns:
        body.append(_text(cx, y0 + 12, label, size=12, anchor=anchor, weight="600"))
    body.append(_line(tx, y0 + 18, tx + 270, y0 + 18, MUTED))
    for row, b in enumerate(usable):
        ty = y0 + 36 + 20 * row
        cells = (f"{b.low:.1f}–{b.high:.1f}", _pct(b.mean_risk), _pct(b.observed_rate), str(b.n))
        for (cx, anchor, _label), cell in zip(columns, cells, strict=True):
            body.append(_text(cx, ty, cell, size=12, anchor=anchor))
    ly = y0 + size - 30
    body.append(
        f'<line x1="{tx}" y1="{ly - 4}" x2="{tx + 24}" y2="{ly - 4}" stroke="{MUTED}" '
        'stroke-width="1.5" stroke-dasharray="6 4"/>'
    )
    body.append(_text(tx + 32, ly, "Perfect calibration", size=12))
    body.append(f'<circle cx="{tx + 12}" cy="{ly + 18}" r="6" fill="{PALETTE[0]}"/>')
    body.append(_text(tx + 32, ly + 22, "Observed rate; area grows with cases", size=12))
    return _svg("reliability", _uid("reliability", full_title, desc), width, height, full_title, desc, body)


def line_svg(
    series: Sequence[Series],
    *,
    title: str,
    y_label: str,
    unit: Unit = "percent",
    y_range: tuple[float, float] | None = (0.0, 1.0),
    reference: Reference | None = None,
    x_label: str = "Window start",
) -> str:
    """Time series, one line per series, with an optional confidence band per point.

    The x axis is proportional to time; a point whose value is ``None`` breaks the line
    (a gap), a lone point gets its interval as an error bar. With one series and at most
    twelve points every value is printed next to its marker.

    Args:
        series: The series; those without a single finite value are left out.
        title: Chart title.
        y_label: What the values are, for the y axis and the description.
        unit: How values are printed: ``percent`` for rates in [0, 1], ``number``,
            ``seconds`` or ``count``.
        y_range: Fixed y domain (values beyond it are drawn at the edge); ``None`` fits the data.
        reference: A horizontal line such as an alert bound.
        x_label: Label of the time axis.

    Returns:
        An ``<svg>`` element as a string.
    """
    cleaned = [_clean_series(s) for s in series]
    cleaned = [s for s in cleaned if any(p.value is not None for p in s.points)]
    if not cleaned:
        return _empty("line", title, f"No data yet: no {y_label.lower()} in these windows.")
    ref_value = _finite(reference.value) if reference is not None else None
    instants = sorted({_instant(p.at) for s in cleaned for p in s.points})
    with_time = any(
        isinstance(p.at, datetime) and _instant(p.at).time() != time() for s in cleaned for p in s.points
    )

    def date_label(at: date) -> str:
        return _instant(at).strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")

    desc = _line_desc(cleaned, title=title, y_label=y_label, unit=unit, reference=reference, dates=date_label)
    bounded = any(p.low is not None for s in cleaned for p in s.points)
    values = [v for s in cleaned for p in s.points for v in (p.value, p.low, p.high) if v is not None]
    if ref_value is not None:
        values.append(ref_value)
    fixed = y_range is not None and _finite(y_range[0]) is not None and _finite(y_range[1]) is not None
    if y_range is not None and fixed and y_range[1] > y_range[0]:
        lo, hi = float(y_range[0]), float(y_range[1])
        ticks = [t for t in _ticks(lo, hi, unit) if lo - 1e-9 <= t <= hi + 1e-9]
    else:
        ticks = _ticks(min(values), max(values), unit)
        lo, hi = ticks[0], ticks[-1]

    legend: list[tuple[str, str]] = []  # (swatch svg at the origin, label)
    if len(cleaned) > 1 or bounded or ref_value is not None:
        for i, s in enumerate(cleaned):
            legend.append((_series_swatch(i), s.label))
    if bounded:
        legend.append(
            (f'<rect x="0" y="-6" width="24" height="12" fill="{PALETTE[0]}" fill-opacity="0.2"/>', "95% CI")
        )
    if reference is not None and ref_value is not None:
        legend.append(
            (
                f'<line x1="0" y1="0" x2="24" y2="0" stroke="{ALERT}" stroke-width="2" '
                'stroke-dasharray="5 3"/>',
                reference.label,
            )
        )

    width, height = 640, 340
    x0, x1 = 76.0, width - 28.0
    legend_svg, legend_rows = _legend(legend, x0, 44, x1)
    y0 = 52.0 + 20 * legend_rows
    y1 = height - 72.0
    pad = 18.0
    span = (instants[-1] - instants[0]).total_seconds()
    x = _Scale(0.0, span, x0 + pad, x1 - pad)
    y = _Scale(lo, hi, y1, y0)

    def px(at: date) -> float:
        return x((_instant(at) - instants[0]).total_seconds())

    body = [_heading(title, width), *legend_svg]
    body.append(_rect("plot-area", x0, y0, x1 - x0, y1 - y0, fill="none", stroke="none"))
    for tick in ticks:
        body.append(_line(x0, y(tick), x1, y(tick), stroke=GRID, cls="grid"))
        body.append(
            _text(
                x0 - 8, y(tick) + 4, _tick_label(tick, unit, ticks[-1]), size=12, anchor="end", cls="y-tick"
            )
        )
    body.append(_line(x0, y1, x1, y1, MUTED))
    body.append(_line(x0, y0, x0, y1, MUTED))
    label_width = 7.2 * len(date_label(instants[0])) + 16
    every = max(1, math.ceil(len(instants) / max(1, int((x1 - x0) // label_width))))
    shown = instants[::every]
    for at in shown:
        body.append(_line(px(at), y1, px(at), y1 + 5, MUTED))
        body.append(_text(px(at), y1 + 20, date_label(at), size=12, anchor="middle", cls="x-tick"))
    body.append(_text(18, (y0 + y1) / 2, y_label, anchor="middle", rotate=True))
    body.append(_text((x0 + x1) / 2, height - 18, x_label, anchor="middle"))
    if ref_value is not None:
        body.append(
            f'<line class="reference" x1="{_n(x0)}" y1="{_n(y(ref_value))}" x2="{_n(x1)}" '
            f'y2="{_n(y(ref_value))}" stroke="{ALERT}" stroke-width="2" stroke-dasharray="5 3"/>'
        )

    label_points = len(cleaned) == 1 and sum(p.value is not None for p in cleaned[0].points) <= 12
    for i, s in enumerate(cleaned):
        colour = PALETTE[i % len(PALETTE)]
        runs = _runs(s.points, lambda p: p.value is not None)
        isolated = {id(run[0]) for run in runs if len(run) == 1}
        for run in runs:
            for band in _runs(run, lambda p: p.low is not None and p.high is not None):
                if len(band) > 1:
                    upper = [f"{_n(px(p.at))},{_n(y(_num(p.high)))}" for p in band]
                    lower = [f"{_n(px(p.at))},{_n(y(_num(p.low)))}" for p in reversed(band)]
                    body.append(
                        f'<path class="ci-band" d="M{" L".join(upper + lower)} Z" fill="{colour}" '
                        'fill-opacity="0.18" stroke="none"/>'
                    )
                else:
                    p = band[0]
                    cx, top, bottom = px(p.at), y(_num(p.high)), y(_num(p.low))
                    body.append(
                        f'<path class="ci-bar" d="M{_n(cx)} {_n(bottom)} V{_n(top)} M{_n(cx - 5)} {_n(top)} '
                        f'H{_n(cx + 5)} M{_n(cx - 5)} {_n(bottom)} H{_n(cx + 5)}" stroke="{colour}" '
                        'stroke-width="1.5" fill="none"/>'
                    )
            if len(run) > 1:
                coords = " ".join(f"{_n(px(p.at))},{_n(y(_num(p.value)))}" for p in run)
                dash = DASHES[i % len(DASHES)]
                dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
                body.append(
                    f'<polyline class="line" data-series="{i}" points="{coords}" fill="none" '
                    f'stroke="{colour}" stroke-width="2.25"{dash_attr}/>'
                )
        for p in s.points:
            if p.value is None:
                continue
            cx, cy = px(p.at), y(p.value)
            tip = f"{s.label}, {date_label(p.at)}: {_point_text(p, unit)}"
            body.append(
                f'<g class="point" data-series="{i}" transform="translate({_n(cx)} {_n(cy)})">'
                f"{_marker(i)}<title>{_esc(tip)}</title></g>"
            )
            if label_points:
                # Beside a lone point (its error bar runs through the space above), else above it.
                if id(p) in isolated:
                    tx, ty, anchor = cx + 10, cy + 4, "start"
                else:
                    tx, ty, anchor = cx, (cy - 11 if cy - 11 > y0 + 10 else cy + 21), "middle"
                body.append(
                    _text(
                        tx, ty, _format(p.value, unit), size=12, anchor=anchor, cls="point-label", halo=True
                    )
                )

    return _svg("line", _uid("line", title, desc), width, height, title, desc, body)


def bars_svg(
    rows: Sequence[BarRow],
    *,
    series: Sequence[str],
    title: str,
    unit: Unit = "percent",
    x_label: str = "",
    x_max: float | None = None,
    paired: bool = False,
) -> str:
    """Horizontal grouped bars: one group per row, one bar per series, each value printed.

    Args:
        rows: The categories, top to bottom; each has one value per series.
        series: Series names, e.g. ``["median", "90th percentile"]``.
        title: Chart title.
        unit: How values are printed (see :func:`line_svg`).
        x_label: Label of the value axis.
        x_max: Fix the end of the value axis (e.g. 1.0 for rates); by default it fits the data.
        paired: Series come in pairs (e.g. median and p90 for "before", then for "after"):
            a pair shares a colour and its second bar is hatched.

    Returns:
        An ``<svg>`` element as a string.

    Raises:
        ValueError: A row does not have one value per series.
    """
    for row in rows:
        if len(row.values) != len(series):
            raise ValueError(f"row {row.label!r} has {len(row.values)} values for {len(series)} series")
    values = [[_finite(v) for v in row.values] for row in rows]
    present = [v for vs in values for v in vs if v is not None]
    if not present:
        return _empty("bars", title, "No data yet.")
    top = max(max(present), 0.0)
    if x_max is not None and _finite(x_max) is not None:
        top = max(top, float(x_max))
    ticks = _ticks(0.0, top, unit)
    multi = len(series) > 1
    parts = []
    for row, row_values in zip(rows, values, strict=True):
        head = _clean(row.label) + (f" ({_clean(row.note)})" if row.note else "")
        said = ", ".join(
            f"{name} {_format(v, unit) if v is not None else 'no data'}"
            for name, v in zip(series, row_values, strict=True)
        )
        parts.append(f"{head}: {said}")
    desc = f"{title}. Bar chart, {len(rows)} {_plural(len(rows), 'row')}. " + "; ".join(parts) + "."
    uid = _uid("bars", title, desc)

    # Room on the right for the longest printed value; the chart widens rather than clip it.
    value_texts = [
        (f"{name}: " if multi else "") + (_format(v, unit) if v is not None else "no data")
        for row_values in values
        for name, v in zip(series, row_values, strict=True)
    ]
    text_px = 6.8 * max(len(t) for t in value_texts) + 14
    # The label column grows with the longest label or note, up to a point (then they are shortened).
    longest = max(max(len(_clean(r.label)) * 7.3, len(_clean(r.note)) * 6.8) for r in rows)
    x0 = min(max(206.0, longest + 34), 330.0)
    width = int(max(760.0, x0 + 300 + text_px + 16))
    x1 = width - 16 - text_px
    styles = [_bar_style(uid, i, paired) for i in range(len(series))]
    legend = [
        (f'<rect x="0" y="-7" width="22" height="14" fill="{fill}" stroke="{stroke}"/>', name)
        for name, (fill, stroke) in zip(series, styles, strict=True)
    ]
    legend_svg, legend_rows = _legend(legend if multi else [], 16, 44, width - 16)
    y0 = 52.0 + 20 * legend_rows + 6
    bar_h, bar_gap, row_gap = 18.0, 4.0, 16.0
    blocks = [max(len(series) * (bar_h + bar_gap) - bar_gap, 36.0 if row.note else bar_h) for row in rows]
    y1 = y0 + sum(blocks) + row_gap * len(rows)
    height = int(y1 + 56)
    x = _Scale(0.0, ticks[-1], x0, x1)

    body = [_heading(title, width), *legend_svg, _patterns(uid, styles)]
    body.append(_rect("plot-area", x0, y0, x1 - x0, y1 - y0, fill="none", stroke="none"))
    for tick in ticks:
        body.append(_line(x(tick), y0, x(tick), y1, stroke=GRID, cls="grid"))
        body.append(_line(x(tick), y1, x(tick), y1 + 5, MUTED))
        body.append(_text(x(tick), y1 + 20, _tick_label(tick, unit, ticks[-1]), size=12, anchor="middle"))
    body.append(_line(x0, y0, x0, y1, MUTED))
    body.append(_line(x0, y1, x1, y1, MUTED))
    if x_label:
        body.append(_text((x0 + x1) / 2, y1 + 44, x_label, anchor="middle"))

    top_y = y0 + row_gap / 2
    for row, row_values, block in zip(rows, values, blocks, strict=True):
        middle = top_y + block / 2
        label = _fit(_clean(row.label), x0 - 24, 13)
        tip = row.label if label != _clean(row.label) else None  # the full label on hover
        if row.note:
            body.append(_text(x0 - 10, middle - 3, label, anchor="end", cls="row-label", tip=tip))
            body.append(
                _text(
                    x0 - 10,
                    middle + 13,
                    _fit(_clean(row.note), x0 - 24, 12),
                    size=12,
                    anchor="end",
                    fill=MUTED,
                )
            )
        else:
            body.append(_text(x0 - 10, middle + 4.5, label, anchor="end", cls="row-label", tip=tip))
        bars_top = middle - (len(series) * (bar_h + bar_gap) - bar_gap) / 2
        for i, (name, value) in enumerate(zip(series, row_values, strict=True)):
            by = bars_top + i * (bar_h + bar_gap)
            prefix = f"{name}: " if multi else ""
            if value is None:
                body.append(
                    _text(
                        x0 + 6, by + bar_h / 2 + 4.5, f"{prefix}no data", size=12, fill=MUTED, cls="missing"
                    )
                )
                continue
            fill, stroke = styles[i]
            bar = max(x(value) - x0, 0.0)
            tip = f"{row.label}, {name}: {_format(value, unit)}"
            body.append(
                f'<rect class="bar" data-series="{i}" x="{_n(x0)}" y="{_n(by)}" width="{_n(bar)}" '
                f'height="{_n(bar_h)}" fill="{fill}" stroke="{stroke}"><title>{_esc(tip)}</title></rect>'
            )
            body.append(
                _text(
                    x0 + bar + 6,
                    by + bar_h / 2 + 4.5,
                    f"{prefix}{_format(value, unit)}",
                    size=12,
                    cls="value",
                )
            )
        top_y += block + row_gap

    return _svg("bars", uid, width, height, title, desc, body)


# ---------------------------------------------------------------------------- adapters


def charts_for_metrics(
    metrics: Mapping[str, Any],
    *,
    before: Mapping[str, Any] | None = None,
    labels: tuple[str, str] = ("before", "after"),
) -> dict[str, str]:
    """The charts for one model version's entry of ``model_metrics`` (one window).

    Args:
        metrics: One element of ``monitoring.model_metrics(...)`` (or of the JSON
            ``models`` list of ``GET /v1/metrics/model``).
        before: The same model's entry for an earlier window: time to first read is then
            drawn as before/after groups.
        labels: Names of the two windows when ``before`` is given.

    Returns:
        ``{"calibration", "override_reasons", "time_to_first_read"}`` mapped to SVG strings.
    """
    return {
        "calibration": calibration_svg(metrics),
        "override_reasons": override_reasons_svg(metrics),
        "time_to_first_read": time_to_read_svg(metrics, before=before, labels=labels),
    }


def _reliability_bins(calibration: Mapping[str, Any]) -> list[ReliabilityBin]:
    """The bins of a calibration summary (``models.metrics`` shape), as the chart draws them."""
    return [
        ReliabilityBin(
            low=_num(b.get("low")),
            high=_num(b.get("high")),
            n=int(b.get("n") or 0),
            mean_risk=_num(b.get("mean_risk")),
            observed_rate=_num(b.get("observed_rate")),
        )
        for b in calibration.get("bins") or []
    ]


def calibration_svg(metrics: Mapping[str, Any]) -> str:
    """Reliability diagram from ``metrics["ai_vs_final_read"]["calibration"]``."""
    calibration = _get(metrics, "ai_vs_final_read", "calibration") or {}
    bins = _reliability_bins(calibration)
    return reliability_svg(
        bins, ece=calibration.get("ece"), title=f"Calibration of {_model_name(metrics)} against final reads"
    )


def validation_svg(report: Mapping[str, Any]) -> str:
    """Reliability diagram of a clinic's local validation (:func:`triage_api.golive.validation`)."""
    calibration = _get(report, "card", "calibration") or {}
    bins = _reliability_bins(calibration)
    title = f"Calibration of {report.get('model_ref')} at {report.get('clinic')}, AI-blind reads"
    return reliability_svg(bins, ece=calibration.get("ece"), title=title)


def override_reasons_svg(metrics: Mapping[str, Any]) -> str:
    """Override rate by reason: overrides for that reason / primary reads that had an AI opinion."""
    overrides = metrics.get("overrides") or {}
    reads = int(overrides.get("reads_with_ai") or 0)
    name = _model_name(metrics)
    if reads == 0:
        return _empty("bars", f"Overrides of {name} by reason", "No data yet: no reads with an AI opinion.")
    counts = sorted(
        ((_reason_label(reason), int(count)) for reason, count in (overrides.get("by_reason") or {}).items()),
        key=lambda item: (-item[1], item[0]),
    )
    rate = _finite(overrides.get("rate"))
    total = sum(count for _, count in counts)
    title = f"Overrides of {name} by reason: {_pct(rate) if rate is not None else 'n/a'} of {reads} reads"
    if not counts:
        counts = [("no overrides", 0)]
    rows = [BarRow(label, [count / reads], note=f"{count} of {reads} reads") for label, count in counts]
    if total and len(counts) > 1:
        rows.insert(0, BarRow("any reason", [total / reads], note=f"{total} of {reads} reads"))
    return bars_svg(
        rows, series=["override rate"], title=title, unit="percent", x_label="Share of reads with AI"
    )


def time_to_read_svg(
    metrics: Mapping[str, Any],
    *,
    before: Mapping[str, Any] | None = None,
    labels: tuple[str, str] = ("before", "after"),
) -> str:
    """Median and 90th percentile of arrival-to-first-read time per risk tier (``time_to_first_read``)."""
    periods = [metrics] if before is None else [before, metrics]
    stats = ("median", "90th percentile")
    names = list(stats) if before is None else [f"{s} ({label})" for label in labels for s in stats]
    rows = []
    for tier in Tier:
        values: list[float | None] = []
        notes = []
        for period in periods:
            entry = _get(period, "time_to_first_read", tier) or {}
            values += [_finite(entry.get("median_seconds")), _finite(entry.get("p90_seconds"))]
            notes.append(f"n={int(entry.get('n') or 0)}")
        note = (
            notes[0]
            if before is None
            else ", ".join(f"{label} {n}" for label, n in zip(labels, notes, strict=True))
        )
        rows.append(BarRow(tier, values, note=note))
    return bars_svg(
        rows,
        series=names,
        title=f"Time from arrival to first read, {_model_name(metrics)}",
        unit="seconds",
        x_label="Time to first read",
        paired=True,
    )


def not_analyzed_svg(models: Sequence[Mapping[str, Any]], *, top: int = 10) -> str:
    """Cases the gate kept from the model, by reason, over all entries of one window.

    Not-analysed cases carry no model version (they sit in the ``"none"`` entry), so this
    chart takes the whole ``models`` list: share = cases for that reason / all cases.
    Reasons beyond the ``top`` most frequent are summed into one row.
    """
    cases = sum(int(m.get("cases") or 0) for m in models)
    counts: dict[str, int] = {}
    for m in models:
        for reason, count in (_get(m, "not_analyzed", "by_reason") or {}).items():
            label = _reason_label(reason)
            counts[label] = counts.get(label, 0) + int(count)
    title = "Cases not analysed by the model, by reason"
    if cases == 0:
        return _empty("bars", title, "No data yet: no cases in this window.")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if len(ranked) > top:
        rest = ranked[top:]
        ranked = [*ranked[:top], (f"{len(rest)} other reasons", sum(c for _, c in rest))]
    total = sum(counts.values())
    title += f": {_pct(total / cases)} of {cases} cases"
    rows = [BarRow(label, [count / cases], note=f"{count} of {cases} cases") for label, count in ranked]
    if not rows:
        rows = [BarRow("none", [0.0], note=f"0 of {cases} cases")]
    return bars_svg(rows, series=["share of cases"], title=title, unit="percent", x_label="Share of cases")


def charts_for_windows(
    payloads: Sequence[Mapping[str, Any]],
    *,
    override_rate_bound: float | None = None,
    psi_bound: float | None = None,
) -> dict[str, str]:
    """Trends over consecutive windows, one line per model version.

    Args:
        payloads: One ``{"window": {"since": ..., "until": ...}, "models": [...]}`` per
            window (the body of ``GET /v1/metrics/model``; ``since`` a datetime or an
            ISO 8601 string). Points sit at each window's start.
        override_rate_bound: Alert bound drawn on the override-rate chart
            (``settings.alert_override_rate``).
        psi_bound: Alert bound drawn on the drift chart (``settings.alert_drift_psi``).

    Returns:
        ``{"auroc", "override_rate", "appeal_rate", "overturn_rate", "not_analyzed_share",
        "drift_psi"}`` mapped to SVG strings.
    """
    windows = sorted(((_parse_instant(_get(p, "window", "since")), p) for p in payloads), key=lambda w: w[0])
    refs = sorted({str(m.get("model_ref")) for _, p in windows for m in p.get("models") or []})

    Pick = Callable[[datetime, Mapping[str, Any]], Point]

    def trend(pick: Pick) -> list[Series]:
        out = []
        for ref in refs:
            points = []
            for at, payload in windows:
                entry = next((m for m in payload.get("models") or [] if str(m.get("model_ref")) == ref), None)
                points.append(pick(at, entry) if entry is not None else Point(at, None))
            out.append(Series(_model_name({"model_ref": ref}), points))
        return out

    def auroc(at: datetime, m: Mapping[str, Any]) -> Point:
        ai = m.get("ai_vs_final_read") or {}
        ci = ai.get("auroc_ci95") or (None, None)
        return Point(at, _finite(ai.get("auroc")), _finite(ci[0]), _finite(ci[1]), n=ai.get("n"))

    def field(section: str, key: str, n: str) -> Pick:
        """Point from ``m[section][key]``, its sample size from ``m[section][n]`` (or the case count)."""

        def pick(at: datetime, m: Mapping[str, Any]) -> Point:
            size = _get(m, section, n) if n else m.get("cases")
            return Point(at, _finite(_get(m, section, key)), n=size)

        return pick

    share = []
    for at, payload in windows:
        models = payload.get("models") or []
        cases = sum(int(m.get("cases") or 0) for m in models)
        gated = sum(int(c) for m in models for c in (_get(m, "not_analyzed", "by_reason") or {}).values())
        share.append(Point(at, gated / cases if cases else None, n=cases))

    override_ref = Reference(override_rate_bound, "alert bound") if override_rate_bound is not None else None
    psi_ref = Reference(psi_bound, "alert bound") if psi_bound is not None else None
    return {
        "auroc": line_svg(
            trend(auroc),
            title="AUROC of the AI against final reads",
            y_label="AUROC",
            unit="number",
            y_range=None,
        ),
        "override_rate": line_svg(
            trend(field("overrides", "rate", n="reads_with_ai")),
            title="Override rate (reads disagreeing with the AI)",
            y_label="Override rate",
            reference=override_ref,
        ),
        "appeal_rate": line_svg(
            trend(field("appeals", "rate", n="")),
            title="Appeals filed per case",
            y_label="Appeal rate",
        ),
        "overturn_rate": line_svg(
            trend(field("appeals", "overturn_rate", n="decided")),
            title="Decided appeals that overturned the read",
            y_label="Overturn rate",
        ),
        "not_analyzed_share": line_svg(
            [Series("all cases", share)],
            title="Cases not analysed by the model",
            y_label="Share not analysed",
        ),
        "drift_psi": line_svg(
            trend(field("drift", "psi", n="n")),
            title="Score drift against the previous window (PSI)",
            y_label="PSI",
            unit="number",
            y_range=None,
            reference=psi_ref,
        ),
    }


# ---------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Scale:
    """Linear map from a data domain to pixels, clamped to the range."""

    d0: float
    d1: float
    r0: float
    r1: float

    def __call__(self, value: float) -> float:
        if self.d1 == self.d0:
            return (self.r0 + self.r1) / 2
        t = min(1.0, max(0.0, (value - self.d0) / (self.d1 - self.d0)))
        return self.r0 + t * (self.r1 - self.r0)


def _finite(value: object) -> float | None:
    """A real number as float (numpy scalars included); NaN, infinities, absurd magnitudes
    (beyond ``LIMIT``, where tick arithmetic would overflow) and non-numbers are missing."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) and abs(number) <= LIMIT else None


def _num(value: object) -> float:
    """A finite float, or NaN for the caller to filter (never written out)."""
    number = _finite(value)
    return number if number is not None else math.nan


def _get(mapping: Mapping[str, Any] | None, *keys: str) -> Any:
    current: Any = mapping
    for key in keys:
        if not isinstance(current, Mapping):
            return None
        current = current.get(key)
    return current


def _clean(text: object) -> str:
    return _NOT_XML.sub("", str(text))


def _esc(text: object) -> str:
    return escape(_clean(text), {'"': "&quot;"})


def _n(value: float) -> str:
    """A coordinate: finite, two decimals at most."""
    if not math.isfinite(value):
        raise ValueError("non-finite coordinate")
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def _pct(value: float) -> str:
    return _format(value, "percent")


def _format(value: float, unit: Unit) -> str:
    if unit == "percent":
        pct = value * 100
        return f"{pct:.1f}%" if abs(pct) < 10 and round(pct, 1) != round(pct) else f"{pct:.0f}%"
    if unit == "seconds":
        return duration(value)
    if unit == "count":
        return f"{value:.0f}"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3f}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def duration(seconds: float | None) -> str:
    """``42 s``, ``7.5 min``, ``3.5 h``, ``4.0 d``; an em dash for no data.

    The one duration format of the web pages (also their ``duration`` template filter).
    Same thresholds as the axes' units, so values and axis ticks mostly share a unit.
    """
    if seconds is None:
        return "—"
    if seconds <= 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes <= 120:
        return f"{minutes:.1f} min" if minutes < 10 else f"{minutes:.0f} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours <= 72 else f"{hours / 24:.1f} d"


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds <= 120:
        return 1.0, "s"
    if seconds <= 120 * 60:
        return 60.0, "min"
    if seconds <= 72 * 3600:
        return 3600.0, "h"
    return 86400.0, "d"


def _ticks(low: float, high: float, unit: Unit = "number", target: int = 5) -> list[float]:
    """Round tick values covering [low, high] (for seconds: round in minutes, hours or days)."""
    if unit == "seconds":
        scale, _ = _time_unit(max(abs(low), abs(high)))
        return [t * scale for t in _ticks(low / scale, high / scale, "number", target)]
    if not high - low > 1e-9 * max(1.0, abs(low), abs(high)):  # flat, or too thin to tick (5e-324)
        pad = abs(low) * 0.1 if abs(low) > 1e-6 else 0.1
        low, high = (low, low + pad) if low == 0 else (low - pad, high + pad)
    raw = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(round((last - first) / step) + 1)]


def _tick_label(value: float, unit: Unit, axis_max: float = 0.0) -> str:
    """A tick value; seconds are shown in the unit chosen for the whole axis (``axis_max``)."""
    if unit == "percent":
        return f"{round(value * 100, 6):g}%"
    if unit == "seconds":
        scale, suffix = _time_unit(axis_max)
        return f"{round(value / scale, 6):g} {suffix}" if value else "0"
    return f"{round(value, 6):g}"


def _fit(text: str, width: float, size: int) -> str:
    """Shorten text to about ``width`` pixels (the full text stays in the description)."""
    room = max(4, int(width / (0.56 * size)))
    return text if len(text) <= room else text[: room - 1].rstrip() + "…"


def _instant(at: date) -> datetime:
    if isinstance(at, datetime):
        return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return datetime.combine(at, time(), UTC)


def _parse_instant(value: object) -> datetime:
    if isinstance(value, date):
        return _instant(value)
    if isinstance(value, str):
        return _instant(datetime.fromisoformat(value))
    raise ValueError(f"window start must be a datetime or an ISO 8601 string, not {value!r}")


def _model_name(metrics: Mapping[str, Any]) -> str:
    ref = metrics.get("model_ref")
    return "no model (not analysed)" if ref in (None, "none") else f"model {ref}"


def _reason_label(reason: object) -> str:
    if reason is None or reason == "null":
        return "no reason given"
    return _clean(reason).replace("_", " ")


def _point_text(p: Point, unit: Unit) -> str:
    text = _format(_num(p.value), unit)
    if p.low is not None and p.high is not None:
        text += f" (95% CI {_format(p.low, unit)} to {_format(p.high, unit)})"
    if p.n is not None:
        text += f", n={p.n}"
    return text


def _clean_series(s: Series) -> Series:
    points = []
    for p in sorted(s.points, key=lambda p: _instant(p.at)):
        value, low, high = _finite(p.value), _finite(p.low), _finite(p.high)
        if value is None or low is None or high is None:
            low = high = None
        n = int(p.n) if isinstance(p.n, numbers.Integral) and not isinstance(p.n, bool) else None
        points.append(Point(p.at, value, low, high, n))
    return Series(_clean(s.label), points)


def _runs(points: Sequence[Point], keep: Callable[[Point], bool]) -> list[list[Point]]:
    runs: list[list[Point]] = [[]]
    for p in points:
        if keep(p):
            runs[-1].append(p)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _line_desc(
    series: Sequence[Series],
    *,
    title: str,
    y_label: str,
    unit: Unit,
    reference: Reference | None,
    dates: Callable[[date], str],
) -> str:
    instants = sorted({_instant(p.at) for s in series for p in s.points})
    parts = [
        f"{title}. Line chart of {y_label.lower()} over {len(instants)} {_plural(len(instants), 'window')}"
        + (
            f" from {dates(instants[0])} to {dates(instants[-1])}"
            if len(instants) > 1
            else f" on {dates(instants[0])}"
        )
        + "."
    ]
    for s in series:
        defined = [p for p in s.points if p.value is not None]
        missing = len(s.points) - len(defined)
        if len(s.points) <= 12:
            said = "; ".join(
                f"{dates(p.at)} {_point_text(p, unit) if p.value is not None else 'no data'}"
                for p in s.points
            )
        else:
            latest = defined[-1]
            low = min(defined, key=lambda p: _num(p.value))
            high = max(defined, key=lambda p: _num(p.value))
            said = (
                f"latest {_point_text(latest, unit)} on {dates(latest.at)}; "
                f"lowest {_format(_num(low.value), unit)} on {dates(low.at)}; "
                f"highest {_format(_num(high.value), unit)} on {dates(high.at)}; "
                f"{missing} {_plural(missing, 'window')} without data"
            )
        parts.append(f"{s.label}: {said}.")
    ref_value = _finite(reference.value) if reference is not None else None
    if reference is not None and ref_value is not None:
        above = sum(1 for s in series for p in s.points if p.value is not None and p.value > ref_value)
        parts.append(
            f"Dashed line: {_clean(reference.label)} at {_format(ref_value, unit)}; "
            f"{above} {_plural(above, 'value')} above it."
        )
    return " ".join(parts)


def _text(
    x: float,
    y: float,
    content: str,
    *,
    size: int = 13,
    anchor: str = "start",
    weight: str | None = None,
    fill: str = INK,
    cls: str | None = None,
    rotate: bool = False,
    halo: bool = False,
    tip: str | None = None,
) -> str:
    attrs = f'x="{_n(x)}" y="{_n(y)}" font-size="{size}" fill="{fill}"'
    if halo:  # a white outline keeps the text readable over lines and bands
        attrs += ' stroke="#ffffff" stroke-width="3" stroke-linejoin="round" paint-order="stroke"'
    if anchor != "start":
        attrs += f' text-anchor="{anchor}"'
    if weight:
        attrs += f' font-weight="{weight}"'
    if cls:
        attrs += f' class="{cls}"'
    if rotate:
        attrs += f' transform="rotate(-90 {_n(x)} {_n(y)})"'
    tooltip = f"<title>{_esc(tip)}</title>" if tip else ""
    return f"<text {attrs}>{_esc(content)}{tooltip}</text>"


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, cls: str | None = None) -> str:
    extra = f' class="{cls}"' if cls else ""
    return f'<line{extra} x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{stroke}"/>'


def _rect(cls: str, x: float, y: float, w: float, h: float, *, fill: str, stroke: str = "none") -> str:
    return (
        f'<rect class="{cls}" x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" '
        f'fill="{fill}" stroke="{stroke}"/>'
    )


def _heading(title: str, width: float) -> str:
    return _text(16, 26, _fit(_clean(title), width - 32, 16), size=16, weight="600", cls="chart-title")


def _marker(index: int) -> str:
    colour = PALETTE[index % len(PALETTE)]
    paint = f'fill="{colour}" stroke="#ffffff" stroke-width="1.25"'
    shape = MARKERS[index % len(MARKERS)]
    if shape == "circle":
        return f'<circle r="5" {paint}/>'
    if shape == "square":
        return f'<rect x="-4.5" y="-4.5" width="9" height="9" {paint}/>'
    if shape == "triangle":
        return f'<path d="M0 -6 L5.5 4 L-5.5 4 Z" {paint}/>'
    return f'<path d="M0 -6 L6 0 L0 6 L-6 0 Z" {paint}/>'


def _series_swatch(index: int) -> str:
    colour = PALETTE[index % len(PALETTE)]
    dash = DASHES[index % len(DASHES)]
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="0" y1="0" x2="24" y2="0" stroke="{colour}" stroke-width="2.25"{dash_attr}/>'
        f'<g transform="translate(12 0)">{_marker(index)}</g>'
    )


def _legend(items: Sequence[tuple[str, str]], left: float, top: float, right: float) -> tuple[list[str], int]:
    """Legend entries laid out in rows from (left, top); returns the SVG and the number of rows."""
    if not items:
        return [], 0
    out, x, y, rows = ['<g class="legend">'], left, top, 1
    for swatch, label in items:
        text = _fit(_clean(label), right - left - 40, 12)
        width = 32 + 6.8 * len(text) + 26
        if x > left and x + width > right:
            x, y, rows = left, y + 20, rows + 1
        out.append(f'<g transform="translate({_n(x)} {_n(y)})">{swatch}</g>')
        out.append(_text(x + 32, y + 4, text, size=12))
        x += width
    out.append("</g>")
    return out, rows


def _bar_style(uid: str, index: int, paired: bool) -> tuple[str, str]:
    """(fill, stroke) of series ``index``: colour per series (per pair if paired), odd ones hatched."""
    colour = PALETTE[(index // 2 if paired else index) % len(PALETTE)]
    hatched = index % 2 == 1
    return (f"url(#{uid}-hatch-{index})" if hatched else colour), colour


def _patterns(uid: str, styles: list[tuple[str, str]]) -> str:
    defs = []
    for index, (fill, colour) in enumerate(styles):
        if fill.startswith("url("):
            defs.append(
                f'<pattern id="{uid}-hatch-{index}" patternUnits="userSpaceOnUse" width="6" height="6" '
                f'patternTransform="rotate(45)">'
                f'<rect width="6" height="6" fill="{colour}" fill-opacity="0.25"/>'
                f'<line x1="0" y1="0" x2="0" y2="6" stroke="{colour}" stroke-width="3"/></pattern>'
            )
    return f"<defs>{''.join(defs)}</defs>" if defs else ""


def _empty(kind: str, title: str, message: str) -> str:
    width, height = 640, 150
    body = [
        _heading(title, width),
        _rect("plot-area", 16, 44, width - 32, height - 60, fill="#f6f6f6", stroke=GRID),
        _text(
            width / 2,
            44 + (height - 60) / 2 + 5,
            _fit(message, width - 64, 14),
            size=14,
            anchor="middle",
            fill=MUTED,
            cls="empty",
        ),
    ]
    desc = f"{title}: {message}"
    return _svg(kind, _uid(kind, title, desc), width, height, title, desc, body)


def _uid(kind: str, title: str, desc: str) -> str:
    """An id prefix derived from the content (the description states the numbers), so two
    different charts on one page never share ids."""
    digest = hashlib.sha1(f"{kind}\n{title}\n{desc}".encode("utf-8", "replace")).hexdigest()
    return f"chart-{kind}-{digest[:10]}"


def _svg(kind: str, uid: str, width: float, height: float, title: str, desc: str, body: list[str]) -> str:
    content = "\n".join(body)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-{kind}" role="img" '
        f'viewBox="0 0 {_n(width)} {_n(height)}" width="{_n(width)}" height="{_n(height)}" '
        f'aria-labelledby="{uid}-title {uid}-desc" font-family="{FONT}">\n'
        f'<title id="{uid}-title">{_esc(title)}</title>\n'
        f'<desc id="{uid}-desc">{_esc(desc)}</desc>\n'
        f'<rect class="background" width="{_n(width)}" height="{_n(height)}" fill="#ffffff"/>\n'
        f"{content}\n</svg>"
    )
