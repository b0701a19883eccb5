"""SVG charts: well-formed, accessible, values mapped to the right pixels, text escaped."""

from __future__ import annotations

import copy
import math
import re
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triage_api.vocab import Tier
from triage_api.web import charts
from triage_api.web.charts import BarRow, Point, ReliabilityBin, Series

NS = "{http://www.w3.org/2000/svg}"
START = datetime(2026, 11, 2, tzinfo=UTC)

# One model's entry of monitoring.model_metrics for the hand-computed scenario of
# tests/test_monitoring.py (risks 0.9, 0.8, 0.3, 0.2; finals pneumonia, normal, pneumonia, normal).
METRICS: dict[str, Any] = {
    "model_ref": "m@1",
    "cases": 4,
    "status_counts": {"scored": 4},
    "ai_vs_final_read": {
        "n": 4,
        "positives": 2,
        "auroc": 0.75,
        "auroc_ci95": (0.25, 1.0),
        "calibration": {
            "ece": 0.45,
            "bins": [
                {"low": 0.2, "high": 0.3, "n": 1, "mean_risk": 0.2, "observed_rate": 0.0},
                {"low": 0.3, "high": 0.4, "n": 1, "mean_risk": 0.3, "observed_rate": 1.0},
                {"low": 0.8, "high": 0.9, "n": 1, "mean_risk": 0.8, "observed_rate": 0.0},
                {"low": 0.9, "high": 1.0, "n": 1, "mean_risk": 0.9, "observed_rate": 1.0},
            ],
        },
    },
    "overrides": {"reads_with_ai": 4, "rate": 0.5, "by_reason": {"false_positive": 1, "false_negative": 1}},
    "appeals": {"filed": 1, "rate": 0.25, "decided": 1, "overturn_rate": 0.0},
    "time_to_first_read": {
        "critical": {"n": 2, "median_seconds": 900.0, "p90_seconds": 1140.0},
        "elevated": {"n": 0, "median_seconds": None, "p90_seconds": None},
        "routine": {"n": 1, "median_seconds": 3600.0, "p90_seconds": 3600.0},
    },
    "not_analyzed": {"share": 0.0, "by_reason": {}},
    "drift": {"reference": "previous window", "n": 4, "reference_n": 0, "psi": None},
}
GATED: dict[str, Any] = {
    "model_ref": "none",
    "cases": 1,
    "status_counts": {"not_analyzed": 1},
    "ai_vs_final_read": {
        "n": 0,
        "positives": 0,
        "auroc": None,
        "auroc_ci95": None,
        "calibration": {"ece": None, "bins": []},
    },
    "overrides": {"reads_with_ai": 0, "rate": None, "by_reason": {}},
    "appeals": {"filed": 0, "rate": 0.0, "decided": 0, "overturn_rate": None},
    "time_to_first_read": {t: {"n": 0, "median_seconds": None, "p90_seconds": None} for t in Tier},
    "not_analyzed": {"share": 1.0, "by_reason": {"modality MR": 1}},
    "drift": {"reference": "previous window", "n": 0, "reference_n": 0, "psi": None},
}


def parse(svg: str) -> ET.Element:
    """Parse, and check what every chart owes its reader: an image with a title and a description."""
    root = ET.fromstring(svg)
    assert root.tag == NS + "svg" and root.get("role") == "img"
    title, desc = root[0], root[1]
    assert title.tag == NS + "title" and desc.tag == NS + "desc"
    assert (title.text or "").strip() and (desc.text or "").strip()
    assert root.get("aria-labelledby") == f"{title.get('id')} {desc.get('id')}"
    for element in root.iter():
        for name, value in element.attrib.items():
            assert not re.search(r"nan|inf", value, re.I) or name in ("font-family", "class"), (name, value)
        if element.tag == NS + "text":
            assert float(element.get("font-size", "0")) >= 12
    return root


def title_of(root: ET.Element) -> str:
    return root[0].text or ""


def desc_of(root: ET.Element) -> str:
    return root[1].text or ""


def plot_area(root: ET.Element) -> tuple[float, float, float, float]:
    (area,) = [e for e in root.iter(NS + "rect") if e.get("class") == "plot-area"]
    return tuple(float(area.get(k, "nan")) for k in ("x", "y", "width", "height"))  # type: ignore[return-value]


def of_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if e.get("class") == cls]


def translate(element: ET.Element) -> tuple[float, float]:
    match = re.fullmatch(r"translate\(([-\d.]+) ([-\d.]+)\)", element.get("transform", ""))
    assert match, element.get("transform")
    return float(match.group(1)), float(match.group(2))


def texts(root: ET.Element) -> list[str]:
    return ["".join(e.itertext()) for e in root.iter(NS + "text")]


def weekly(values: list[float | None], **extra: Any) -> Series:
    return Series("m@1", [Point(START + timedelta(weeks=i), v, **extra) for i, v in enumerate(values)])


# ---------------------------------------------------------------------------- reliability


def test_reliability_maps_risk_and_rate_to_the_plot_and_states_the_ece() -> None:
    bins = [
        ReliabilityBin(0.2, 0.3, 10, mean_risk=0.25, observed_rate=0.5),
        ReliabilityBin(0.7, 0.8, 40, mean_risk=0.75, observed_rate=1.0),
    ]
    root = parse(charts.reliability_svg(bins, ece=0.375))
    assert "ECE 0.375" in title_of(root) and "50 cases" in title_of(root)
    assert "predicted 25%, observed 50%, 10 cases" in desc_of(root)
    x, y, w, h = plot_area(root)
    low, high = of_class(root, "bin")
    assert float(low.get("cx", "")) == pytest.approx(x + 0.25 * w, abs=0.01)
    assert float(low.get("cy", "")) == pytest.approx(y + h / 2, abs=0.01)  # rate 0.5: the middle
    assert float(high.get("cy", "")) == pytest.approx(y, abs=0.01)  # rate 1.0: the top
    assert float(high.get("r", "")) > float(low.get("r", ""))  # more cases, bigger marker
    (diagonal,) = of_class(root, "diagonal")
    assert [float(diagonal.get(k, "")) for k in ("x1", "y1", "x2", "y2")] == pytest.approx(
        [x, y + h, x + w, y]
    )
    small, big = of_class(root, "count-bar")
    assert float(big.get("height", "")) == pytest.approx(4 * float(small.get("height", "")))
    assert float(small.get("x", "")) == pytest.approx(x + 0.2 * w + 1, abs=0.01)
    assert {"10", "40"} <= set(texts(root))  # counts printed, not only drawn


def test_reliability_from_the_monitoring_payload() -> None:
    root = parse(charts.calibration_svg(METRICS))
    assert "ECE 0.450" in title_of(root) and "4 cases" in title_of(root)
    assert "risk 0.8 to 0.9: predicted 80%, observed 0%, 1 case" in desc_of(root)
    assert len(of_class(root, "bin")) == 4


def test_reliability_without_bins_says_no_data_yet() -> None:
    for svg in (charts.reliability_svg([], ece=None), charts.calibration_svg(GATED)):
        root = parse(svg)
        assert "No data yet" in desc_of(root) and any("No data yet" in t for t in texts(root))
        assert not of_class(root, "bin")


def test_reliability_drops_non_finite_bins_and_missing_ece() -> None:
    bins = [
        ReliabilityBin(0.0, 0.1, 3, mean_risk=math.nan, observed_rate=0.0),
        ReliabilityBin(0.5, 0.6, 2, mean_risk=0.55, observed_rate=math.inf),
        ReliabilityBin(0.6, 0.7, 5, mean_risk=0.65, observed_rate=0.6),
    ]
    root = parse(charts.reliability_svg(bins, ece=math.nan))
    assert "ECE not available" in title_of(root)
    assert len(of_class(root, "bin")) == 1


# ---------------------------------------------------------------------------- line


def test_line_maps_values_and_time_proportionally() -> None:
    # Weeks 0, 1 and 4: the middle point sits a quarter of the way along.
    series = Series(
        "m@1",
        [Point(START, 0.0), Point(START + timedelta(weeks=1), 0.5), Point(START + timedelta(weeks=4), 1.0)],
    )
    root = parse(charts.line_svg([series], title="Override rate", y_label="Override rate"))
    x, y, w, h = plot_area(root)
    (first, middle, last) = [translate(p) for p in of_class(root, "point")]
    assert middle[1] == pytest.approx(y + h / 2, abs=0.01)  # 0.5 at the vertical middle
    assert first[1] == pytest.approx(y + h, abs=0.01) and last[1] == pytest.approx(y, abs=0.01)
    assert (middle[0] - first[0]) / (last[0] - first[0]) == pytest.approx(0.25, abs=1e-3)
    assert x < first[0] < last[0] < x + w
    assert (first[0] + last[0]) / 2 == pytest.approx(x + w / 2, abs=0.01)  # the span fills the width
    assert last[0] - first[0] > 0.9 * w
    assert len(of_class(root, "line")) == 1
    assert {"2026-11-02", "2026-11-09", "2026-11-30"} <= set(texts(root))
    assert ["".join(e.itertext()) for e in of_class(root, "point-label")] == ["0%", "50%", "100%"]
    assert "2026-11-09 50%" in desc_of(root)


def test_line_with_a_gap_breaks_the_line_and_says_so() -> None:
    root = parse(charts.line_svg([weekly([0.1, 0.2, None, 0.4, 0.5])], title="t", y_label="Override rate"))
    assert len(of_class(root, "line")) == 2
    assert len(of_class(root, "point")) == 4
    assert "2026-11-16 no data" in desc_of(root)


def test_line_with_one_point_centres_it_with_an_error_bar() -> None:
    root = parse(
        charts.line_svg(
            [weekly([0.5], low=0.25, high=0.75, n=8)], title="One window", y_label="Override rate"
        )
    )
    x, y, w, h = plot_area(root)
    ((px, py),) = [translate(p) for p in of_class(root, "point")]
    assert px == pytest.approx(x + w / 2, abs=0.01) and py == pytest.approx(y + h / 2, abs=0.01)
    assert not of_class(root, "line") and not of_class(root, "ci-band")
    (bar,) = of_class(root, "ci-bar")
    start = re.match(r"M([-\d.]+) ([-\d.]+) V([-\d.]+)", bar.get("d", ""))
    assert start, bar.get("d")
    assert float(start.group(2)) == pytest.approx(y + 0.75 * h, abs=0.01)  # from the low bound
    assert float(start.group(3)) == pytest.approx(y + 0.25 * h, abs=0.01)  # to the high bound
    assert "50% (95% CI 25% to 75%), n=8" in desc_of(root)


def test_line_draws_a_ci_band_only_when_given() -> None:
    with_ci = parse(
        charts.line_svg([weekly([0.5, 0.6], low=0.4, high=0.7)], title="t", y_label="AUROC", unit="number")
    )
    (band,) = of_class(with_ci, "ci-band")
    x, y, w, h = plot_area(with_ci)
    band_ys = [float(b) for _, b in re.findall(r"([-\d.]+),([-\d.]+)", band.get("d", ""))]
    assert min(band_ys) == pytest.approx(y + 0.3 * h, abs=0.01)  # high 0.7 on a 0..1 axis
    assert max(band_ys) == pytest.approx(y + 0.6 * h, abs=0.01)  # low 0.4
    assert "95% CI" in texts(with_ci)
    without = parse(charts.line_svg([weekly([0.5, 0.6])], title="t", y_label="AUROC", unit="number"))
    assert not of_class(without, "ci-band") and not of_class(without, "ci-bar")


def test_line_fits_the_axis_to_the_data_and_draws_a_reference() -> None:
    series = weekly([0.05, 0.1, 0.3])
    root = parse(
        charts.line_svg(
            [series],
            title="PSI",
            y_label="PSI",
            unit="number",
            y_range=None,
            reference=charts.Reference(0.2, "alert bound"),
        )
    )
    x, y, w, h = plot_area(root)
    (reference,) = of_class(root, "reference")
    ticks = [float("".join(t.itertext())) for t in of_class(root, "y-tick")]
    low, high = min(ticks), max(ticks)
    assert low <= 0.05 and high >= 0.3
    assert float(reference.get("y1", "")) == pytest.approx(y + h * (high - 0.2) / (high - low), abs=0.01)
    assert "alert bound at 0.20; 1 value above it" in desc_of(root)


def test_line_series_differ_by_marker_and_dash_not_only_colour() -> None:
    other = Series("m@2", [Point(START, 0.3), Point(START + timedelta(weeks=1), 0.4)])
    root = parse(charts.line_svg([weekly([0.1, 0.2]), other], title="t", y_label="Override rate"))
    first, second = of_class(root, "line")
    assert first.get("stroke-dasharray") != second.get("stroke-dasharray")
    shapes = {
        tuple(child.tag for child in point if child.tag != NS + "title") for point in of_class(root, "point")
    }
    assert len(shapes) == 2
    assert {"m@1", "m@2"} <= set(texts(root))  # a legend names them


def test_line_without_values_says_no_data_yet() -> None:
    for series in ([], [weekly([None, math.nan])]):
        root = parse(charts.line_svg(series, title="Override rate", y_label="Override rate"))
        assert "No data yet" in desc_of(root)
        assert not of_class(root, "point")


def test_line_accepts_dates_and_datetimes_with_times() -> None:
    dated = parse(charts.line_svg([Series("a", [Point(date(2026, 11, 2), 0.4)])], title="t", y_label="y"))
    assert "2026-11-02" in texts(dated)
    hourly = Series("a", [Point(datetime(2026, 11, 2, h), 0.1 * h) for h in (6, 12)])  # naive: read as UTC
    assert "2026-11-02 12:00" in texts(parse(charts.line_svg([hourly], title="t", y_label="y")))


# ---------------------------------------------------------------------------- bars


def test_bars_scale_from_zero_and_print_every_value() -> None:
    rows = [BarRow("false positive", [0.5]), BarRow("false negative", [1.0])]
    root = parse(charts.bars_svg(rows, series=["override rate"], title="Overrides", x_max=1.0))
    x, _, w, _ = plot_area(root)
    half, full = of_class(root, "bar")
    assert float(half.get("x", "")) == pytest.approx(x)
    assert float(half.get("width", "")) == pytest.approx(w / 2, abs=0.01)
    assert float(full.get("width", "")) == pytest.approx(w, abs=0.01)
    assert {"50%", "100%"} <= set(texts(root))
    assert "false positive: override rate 50%" in desc_of(root)


def test_grouped_bars_name_each_bar_and_mark_missing_values() -> None:
    rows = [BarRow("critical", [900.0, 1800.0], note="n=2"), BarRow("elevated", [None, None], note="n=0")]
    root = parse(charts.bars_svg(rows, series=["median", "p90"], title="t", unit="seconds"))
    x, _, w, _ = plot_area(root)
    median, p90 = of_class(root, "bar")
    assert float(p90.get("width", "")) == pytest.approx(2 * float(median.get("width", "")), abs=0.02)
    assert float(p90.get("width", "")) <= w
    shown = texts(root)
    assert {"median: 15 min", "p90: 30 min", "median: no data", "p90: no data"} <= set(shown)
    assert p90.get("fill", "").startswith("url(#")  # hatched: told apart without colour
    pattern_ids = {p.get("id") for p in root.iter(NS + "pattern")}
    assert p90.get("fill", "")[5:-1] in pattern_ids


def test_long_series_names_widen_the_chart_instead_of_clipping_values() -> None:
    before = copy.deepcopy(METRICS)
    root = parse(charts.time_to_read_svg(METRICS, before=before, labels=("previous window", "this window")))
    width = float(root.get("width", ""))
    for value in of_class(root, "value"):
        assert float(value.get("x", "")) + 6.2 * len("".join(value.itertext())) <= width
    assert "previous window n=2, this window n=2" in texts(root)  # the note is not shortened


def test_bars_reject_rows_that_do_not_match_the_series() -> None:
    with pytest.raises(ValueError, match="2 series"):
        charts.bars_svg([BarRow("a", [1.0])], series=["x", "y"], title="t")


def test_bars_without_values_say_no_data_yet() -> None:
    for rows in ([], [BarRow("a", [None])], [BarRow("a", [math.inf])]):
        root = parse(charts.bars_svg(rows, series=["x"], title="t"))
        assert "No data yet" in desc_of(root) and not of_class(root, "bar")


# ---------------------------------------------------------------------------- escaping


def test_labels_are_escaped_everywhere() -> None:
    nasty = '<script>alert("x")</script> & \x00\x1b'
    svgs = [
        charts.bars_svg([BarRow(nasty, [0.5], note=nasty)], series=[nasty], title=nasty),
        charts.line_svg([Series(nasty, [Point(START, 0.5)])], title=nasty, y_label=nasty),
        charts.reliability_svg([ReliabilityBin(0.1, 0.2, 1, 0.15, 0.0)], ece=0.1, title=nasty),
        charts.override_reasons_svg(
            {**METRICS, "overrides": {**METRICS["overrides"], "by_reason": {nasty: 2}}}
        ),
    ]
    for svg in svgs:
        assert "<script" not in svg
        root = parse(svg)  # control characters dropped: still well-formed XML
        assert not list(root.iter("script")) and not list(root.iter(NS + "script"))
        assert "<script>" in title_of(root) + desc_of(root)


def test_ids_differ_between_charts() -> None:
    a = parse(charts.line_svg([weekly([0.1])], title="a", y_label="y"))
    b = parse(charts.line_svg([weekly([0.2])], title="a", y_label="y"))
    assert a[0].get("id") != b[0].get("id")


# ---------------------------------------------------------------------------- adapters


def test_charts_for_metrics_reads_the_monitoring_shape() -> None:
    out = charts.charts_for_metrics(METRICS)
    assert set(out) == {"calibration", "override_reasons", "time_to_first_read"}
    overrides = parse(out["override_reasons"])
    assert "50% of 4 reads" in title_of(overrides)
    assert "false positive (1 of 4 reads): override rate 25%" in desc_of(overrides)
    assert "any reason (2 of 4 reads): override rate 50%" in desc_of(overrides)
    reads = parse(out["time_to_first_read"])
    assert "critical (n=2): median 15 min, 90th percentile 19 min" in desc_of(reads)
    assert "elevated (n=0): median no data" in desc_of(reads)


def test_time_to_read_compares_before_and_after() -> None:
    before = copy.deepcopy(METRICS)
    before["time_to_first_read"]["critical"] = {"n": 5, "median_seconds": 1800.0, "p90_seconds": 3600.0}
    root = parse(charts.time_to_read_svg(METRICS, before=before))
    assert len({b.get("data-series") for b in of_class(root, "bar")}) == 4
    assert "critical (before n=5, after n=2): median (before) 30 min" in desc_of(root)
    assert "median (after) 15 min" in desc_of(root)


def test_override_reasons_without_reads_and_with_a_null_reason() -> None:
    assert "No data yet" in desc_of(parse(charts.override_reasons_svg(GATED)))
    metrics = {**METRICS, "overrides": {"reads_with_ai": 4, "rate": 0.25, "by_reason": {None: 1}}}
    assert "no reason given (1 of 4 reads)" in desc_of(parse(charts.override_reasons_svg(metrics)))


def test_not_analyzed_sums_over_the_window() -> None:
    root = parse(charts.not_analyzed_svg([METRICS, GATED]))
    assert "20% of 5 cases" in title_of(root)
    assert "modality MR (1 of 5 cases): share of cases 20%" in desc_of(root)
    many = {**GATED, "cases": 30, "not_analyzed": {"by_reason": {f"reason {i:02}": 1 for i in range(14)}}}
    assert "4 other reasons (4 of 30 cases)" in desc_of(parse(charts.not_analyzed_svg([many], top=10)))
    assert "No data yet" in desc_of(parse(charts.not_analyzed_svg([])))


def test_charts_for_windows_draws_one_line_per_model_with_gaps() -> None:
    payloads = []
    for week in range(3):
        since = START + timedelta(weeks=week)
        models = [GATED] if week == 1 else [METRICS, GATED]  # m@1 had no cases in week 1
        window = {"since": since.isoformat().replace("+00:00", "Z"), "until": since + timedelta(weeks=1)}
        payloads.append({"window": window, "models": models})
    out = charts.charts_for_windows(list(reversed(payloads)), override_rate_bound=0.3, psi_bound=0.2)
    assert set(out) == {
        "auroc",
        "override_rate",
        "appeal_rate",
        "overturn_rate",
        "not_analyzed_share",
        "drift_psi",
    }
    auroc = parse(out["auroc"])
    assert len(of_class(auroc, "point")) == 2  # the gated group has no AUROC: no series
    assert not of_class(auroc, "line")  # two points either side of a gap
    assert len(of_class(auroc, "ci-bar")) == 2
    assert "2026-11-09 no data" in desc_of(auroc) and "0.75 (95% CI 0.25 to 1.00), n=4" in desc_of(auroc)
    override = parse(out["override_rate"])
    assert of_class(override, "reference") and "2 values above it" in desc_of(override)
    appeal = parse(out["appeal_rate"])
    assert {"model m@1", "no model (not analysed)"} <= set(texts(appeal))
    share = parse(out["not_analyzed_share"])
    assert "2026-11-02 20%, n=5; 2026-11-09 100%, n=1; 2026-11-16 20%, n=5" in desc_of(share)
    assert "No data yet" in desc_of(parse(out["drift_psi"]))  # psi is None throughout


def test_charts_for_windows_with_nothing() -> None:
    out = charts.charts_for_windows([])
    assert all("No data yet" in desc_of(parse(svg)) for svg in out.values())


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)), max_size=8),
    fixed=st.booleans(),
)
def test_any_numbers_give_well_formed_charts_without_nan(values: list[float | None], fixed: bool) -> None:
    y_range = (0.0, 1.0) if fixed else None
    parse(charts.line_svg([weekly(values, low=None, high=None)], title="t", y_label="y", y_range=y_range))
    parse(charts.bars_svg([BarRow(str(i), [v]) for i, v in enumerate(values)], series=["s"], title="t"))
    bins = [ReliabilityBin(0.0, 0.1, 1, mean_risk=v or 0.0, observed_rate=v or 0.0) for v in values]
    parse(charts.reliability_svg(bins, ece=values[0] if values else None))
