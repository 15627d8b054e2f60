"""Learning-curve pictures: force MAE against wall time (mlpot.bench.curves), stage-two mark."""
from __future__ import annotations

import matplotlib.image
import pytest

from mlpot.bench.curves import plot_force_mae_vs_time, read_log_curve
from mlpot.train.plot import plot_learning_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _valid_png(path, min_w=300, min_h=200):
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w
    assert img[..., :3].std() > 0.01  # something drawn, not a blank canvas
    return img


def _log(path, rows):
    cols = "epoch,stage,lr,train_loss,train_e,train_f,train_s,valid_loss,valid_e_mae,valid_f_mae,valid_s_mae,time"
    lines = [cols] + [f"{e},{s},0.01,1.0,0.1,0.2,0.0,{v if v else ''},1.0,{v if v else ''},,{t}"
                      for e, s, v, t in rows]
    (path / "log.csv").write_text("\n".join(lines) + "\n")


def test_read_log_curve_cumulative_time_and_stage_two(tmp_path):
    _log(tmp_path, [(1, 1, 90.0, 2.0), (2, 1, None, 3.0), (3, 2, 50.0, 2.5), (4, 2, 40.0, 2.5)])
    pts, s2 = read_log_curve(tmp_path)
    assert pts == [(2.0, 90.0), (7.5, 50.0), (10.0, 40.0)]
    assert s2 == pytest.approx(5.0)  # epochs 1 and 2 took 5 s before stage two began


def test_force_mae_vs_time_png(tmp_path):
    curves = {"mlpot": [(10.0, 200.0), (60.0, 80.0), (120.0, 40.0)],
              "mace-torch": [(30.0, 150.0), (120.0, 70.0)], "empty": []}
    out = plot_force_mae_vs_time(curves, tmp_path / "sub" / "curves.png", title="t", marks={"mlpot": 60.0})
    assert out == tmp_path / "sub" / "curves.png"
    _valid_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary left behind


def test_learning_curve_marks_stage_two(tmp_path):
    hist = [{"epoch": e, "stage": 1 if e < 4 else 2, "train_loss": 1.0 / e, "valid_loss": 1.2 / e,
             "valid_e_mae": 5.0 / e, "valid_f_mae": 50.0 / e} for e in range(1, 7)]
    assert plot_learning_curve(hist, tmp_path / "learning_curve.png") == 4
    _valid_png(tmp_path / "learning_curve.png")
    one_stage = [dict(r, stage=1) for r in hist]
    assert plot_learning_curve(one_stage, tmp_path / "lc1.png") is None
    _valid_png(tmp_path / "lc1.png")
