"""SVG rendering of the loss curve and the confusion matrix: valid XML, the right marks, odd inputs."""

import itertools
import math
import xml.etree.ElementTree as ET

import pytest

from peft_magic.ui.chart import (
    CurveBuffer,
    confusion_matrix_svg,
    downsample,
    ema,
    loss_chart_from_history,
    loss_chart_svg,
    nice_ticks,
    series_from_history,
)


def parse(svg):
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def marks(root, cls):
    return [el for el in root.iter() if el.get("class") == cls]


def polyline_points(el):
    return [tuple(float(v) for v in pair.split(",")) for pair in el.get("points").split()]


def history(n=30, every=10, evals=(100, 200)):
    rows = [
        {"step": i * every, "epoch": i / 10, "loss": 3.0 / (1 + 0.1 * i), "learning_rate": 2e-4}
        for i in range(1, n + 1)
    ]
    rows += [{"step": s, "eval_loss": 2.0 - s / 1000, "eval_accuracy": 0.8} for s in evals]
    return rows


def test_empty_chart_is_valid_svg_saying_it_waits():
    root = parse(loss_chart_svg())
    assert not marks(root, "train-raw") and not marks(root, "eval-point")
    assert "waiting for the first loss" in "".join(root.itertext())


def test_single_point_is_drawn_as_a_dot():
    root = parse(loss_chart_svg([(10, 2.5)]))
    (dot,) = marks(root, "train-raw")
    assert dot.tag.endswith("circle")
    assert not marks(root, "train-smooth")


def test_many_points_raw_smoothed_and_eval():
    svg = loss_chart_from_history(history(n=30))
    root = parse(svg)
    (raw,) = marks(root, "train-raw")
    (smooth,) = marks(root, "train-smooth")
    assert len(polyline_points(raw)) == 30
    assert len(polyline_points(smooth)) == 30
    assert len(marks(root, "eval-point")) == 2
    # Every mark lies inside the drawing.
    width, height = float(root.get("width")), float(root.get("height"))
    for x, y in polyline_points(raw) + polyline_points(smooth):
        assert 0 <= x <= width and 0 <= y <= height
    # Lower loss is drawn higher up the screen's y axis (SVG y grows downward).
    ys = [y for _, y in polyline_points(raw)]
    assert ys[0] < ys[-1]


def test_nan_and_inf_losses_are_skipped():
    rows = history(n=10, evals=())
    rows[3]["loss"] = float("nan")
    rows[5]["loss"] = float("inf")
    rows.append({"step": 500, "eval_loss": float("nan")})
    root = parse(loss_chart_from_history(rows))
    (raw,) = marks(root, "train-raw")
    assert len(polyline_points(raw)) == 8
    assert not marks(root, "eval-point")
    assert "nan" not in ET.tostring(root, encoding="unicode").lower()


def test_only_eval_points():
    root = parse(loss_chart_svg([], [(50, 2.0)]))
    assert len(marks(root, "eval-point")) == 1


def test_long_runs_are_downsampled():
    train = [(i, 1 + math.sin(i / 50)) for i in range(5000)]
    root = parse(loss_chart_svg(train, max_points=300))
    (raw,) = marks(root, "train-raw")
    assert len(polyline_points(raw)) == 300


def test_constant_loss_does_not_divide_by_zero():
    root = parse(loss_chart_svg([(1, 2.0), (2, 2.0), (3, 2.0)]))
    ys = {y for _, y in polyline_points(marks(root, "train-raw")[0])}
    assert len(ys) == 1


def test_title_is_escaped():
    root = parse(loss_chart_svg([(1, 1.0)], title="loss <&> 'x'"))
    assert "loss <&> 'x'" in "".join(root.itertext())


def test_series_from_history_splits_train_and_eval():
    train, evals = series_from_history(history(n=3, evals=(20,)) + [{"loss": 1.0}])
    assert train == [(10.0, 3.0 / 1.1), (20.0, 2.5), (30.0, 3.0 / 1.3)]
    assert evals == [(20.0, 1.98)]


def test_ema():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no pull toward 0
    assert ema([1.0, 5.0, 3.0], 0.0) == [1.0, 5.0, 3.0]
    smooth = ema([4.0, 0.0], 0.5)
    assert smooth[0] == 4.0 and 0.0 < smooth[1] < 4.0
    assert ema([], 0.6) == []


def test_downsample_keeps_the_mean():
    pts = [(float(i), float(i % 7)) for i in range(1000)]
    out = downsample(pts, 100)
    assert len(out) == 100
    assert sum(y for _, y in out) / 100 == pytest.approx(sum(y for _, y in pts) / 1000, rel=0.01)
    assert downsample(pts[:10], 100) == pts[:10]


@pytest.mark.parametrize("lo, hi", [(0.93, 3.1), (10, 490), (0.001, 0.0013), (-2, 2), (5, 100000)])
def test_nice_ticks_are_round_and_inside(lo, hi):
    ticks = nice_ticks(lo, hi)
    assert 2 <= len(ticks) <= 11
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    steps = {round(b - a, 12) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1
    mantissa = steps.pop() / 10 ** math.floor(math.log10(ticks[1] - ticks[0]))
    assert round(mantissa, 6) in (1, 2, 5)


def test_confusion_matrix_cells_counts_and_labels():
    svg = confusion_matrix_svg([[5, 1, 0], [2, 7, 1], [0, 0, 9]], ["neg", "neu<tral>", "positive"])
    root = parse(svg)
    cells = marks(root, "cm-cell")
    assert len(cells) == 9
    texts = "".join(root.itertext())
    assert "neu<tral>" in texts
    # Diagonal cells of a good classifier are the darkest in their row.
    fills = [c.get("fill") for c in cells]
    darkness = [765 - sum(int(f[i : i + 2], 16) for i in (1, 3, 5)) for f in fills]
    for row in range(3):
        r = darkness[row * 3 : row * 3 + 3]
        assert r[row] == max(r)
    assert [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.text == "9"]


def test_confusion_matrix_many_labels_and_zero_rows():
    n = 60
    matrix = [[0] * n for _ in range(n)]
    matrix[0][0] = 3
    root = parse(confusion_matrix_svg(matrix, [f"class_{i}" for i in range(n)]))
    assert len(marks(root, "cm-cell")) == n * n


def test_confusion_matrix_shape_mismatch():
    with pytest.raises(ValueError, match="2x2"):
        confusion_matrix_svg([[1, 2, 3]], ["a", "b"])


def test_curve_buffer_matches_ema_then_stays_bounded():
    buf = CurveBuffer(max_points=50, smoothing=0.6)
    losses = [3.0 / (1 + i / 10) for i in range(99)]
    for i, loss in enumerate(losses):
        buf.add(i, loss)
    buf.add(99, float("nan"))  # ignored
    assert len(buf) == 99  # not compacted yet: exactly what the history holds
    assert [y for _, y in buf.smooth] == pytest.approx(ema(losses, 0.6))
    for i in range(100, 10_000):
        buf.add(i, 1.0)
    assert 50 <= len(buf) <= 100 and len(buf.smooth) == len(buf)
    xs = [x for x, _ in buf.raw]
    assert xs == sorted(xs) and xs[0] < 200 and xs[-1] > 9_800  # still spans the whole run
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(xs[1:-1])}  # first: NaN skipped; last: partial
    assert gaps == {float(buf.stride)}  # evenly spread: every full bucket holds `stride` steps
    root = parse(loss_chart_svg(buf.raw, smooth=buf.smooth))
    assert len(polyline_points(marks(root, "train-smooth")[0])) == len(buf)
