"""Monitor: metrics.jsonl content, resume truncation == uninterrupted run, TensorBoard scalars, plots, main-only."""
import json
import struct

import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.training.monitor import Monitor, read_metrics


def _metrics(step):
    return {"loss": 5.0 / step, "aux/recon_loss": 0.1 * step, "lr": 1e-3}


def _without_time(records):
    assert all(isinstance(r.pop("time"), float) for r in records)
    return records


def _tb_scalars(tb_dir):
    """Parse tensorboardX event files (TFRecord framing: u64 length, u32 crc, payload, u32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for f in sorted(tb_dir.iterdir()):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value))
    return out


def test_write_jsonl_tensorboard_and_bar(tmp_path, capsys):
    mon = Monitor(tmp_path, total_steps=4, tokens_per_step=256)
    for step in (1, 2, 3, 4):
        mon.write(step, _metrics(step))
    mon.close()
    records = _without_time(read_metrics(tmp_path / "metrics.jsonl"))
    assert records == [{"step": s, **_metrics(s)} for s in (1, 2, 3, 4)]
    scalars = _tb_scalars(tmp_path / "tb")
    assert sorted(scalars) == sorted((s, k, pytest.approx(v)) for s in (1, 2, 3, 4) for k, v in _metrics(s).items())
    bar = capsys.readouterr().err
    assert "4/4" in bar and "loss=1.25" in bar and "tok/s=" in bar


def test_resume_truncates_to_an_uninterrupted_log(tmp_path):
    straight = Monitor(tmp_path / "a", total_steps=10)
    for step in range(1, 11):
        straight.write(step, _metrics(step))
    straight.close()

    # run B logs steps 1..7, its last checkpoint was step 5, it dies and is resumed at 5
    first = Monitor(tmp_path / "b", total_steps=10)
    for step in range(1, 8):
        first.write(step, _metrics(step))
    first.close()
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "loss"')  # a torn line from the crash
    resumed = Monitor(tmp_path / "b", total_steps=10, resume_step=5)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    for step in range(6, 11):
        resumed.write(step, _metrics(step))
    resumed.close()
    assert (_without_time(read_metrics(tmp_path / "b" / "metrics.jsonl"))
            == _without_time(read_metrics(tmp_path / "a" / "metrics.jsonl")))


def test_only_the_main_process_writes(tmp_path):
    mon = Monitor(tmp_path / "w", total_steps=3, is_main_process=False)
    mon.write(1, {"loss": 1.0})
    assert mon.plot(slot_usage=np.ones(4)) == []
    mon.close()
    assert not (tmp_path / "w").exists()


def test_plots(tmp_path):
    mon = Monitor(tmp_path, total_steps=5)
    for step in range(1, 6):
        mon.write(step, _metrics(step))
    paths = mon.plot(slot_usage=np.linspace(0, 1, 32), gate_values=np.random.default_rng(0).uniform(size=(4, 10)))
    mon.close()
    assert sorted(p.name for p in paths) == ["gate_openness.png", "loss_aux_recon_loss.png", "loss_loss.png",
                                             "slot_usage.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    with pytest.raises(GmemError, match=r"one value per slot \[slots\], got shape \(2, 3\)"):
        mon.plot(slot_usage=np.ones((2, 3)))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


@pytest.fixture
def drawn_lines(monkeypatch):
    """{label: (x, y)} of every line matplotlib draws during the test."""
    import matplotlib.pyplot as plt

    lines = {}
    real_plot = plt.Axes.plot

    def spy(self, x, y, *a, **kw):
        lines[kw.get("label")] = (list(x), list(y))
        return real_plot(self, x, y, *a, **kw)

    monkeypatch.setattr(plt.Axes, "plot", spy)
    return lines


def test_evaluate_plot_draws_one_line_per_system(tmp_path, drawn_lines, capsys):
    import json


    from gmem_jax.evaluate import main

    for length, mem in ((128, 0.9), (1024, 0.8)):
        d = tmp_path / f"len{length}"
        d.mkdir()
        (d / "eval_results.json").write_text(json.dumps(
            {"results": {"memory": {"em": mem}, "in_prompt": {"em": 0.5 if length == 128 else 0.1}}}))
    out = tmp_path / "plot.png"
    assert main(["plot", "em", str(out), f"1024={tmp_path / 'len1024'}", f"128={tmp_path / 'len128'}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn_lines == {"in_prompt": ([128.0, 1024.0], [50.0, 10.0]), "memory": ([128.0, 1024.0], [90.0, 80.0])}
    assert main(["plot", "em", str(out), f"256={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_curves_draws_one_line_per_run(tmp_path, drawn_lines, capsys):
    import json


    from gmem_jax.evaluate import main

    for name, ces in (("fast", (3.0, 1.0)), ("slow", (4.0, 2.5))):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * (i + 1), "ce": c, "time": 0.0}) + "\n"
                                                 for i, c in enumerate(ces)))
    out = tmp_path / "curves.png"
    assert main(["curves", "ce", str(out), f"lr 1={tmp_path / 'fast'}", f"lr 2={tmp_path / 'slow'}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn_lines == {"lr 1": ([10, 20], [3.0, 1.0]), "lr 2": ([10, 20], [4.0, 2.5])}
    assert main(["curves", "gate_open", str(out), f"a={tmp_path / 'fast'}"]) == 2
    assert "no 'gate_open'" in capsys.readouterr().err
    assert main(["curves", "ce", str(out), f"a={tmp_path / 'missing'}"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it can (~2.5 CPU-s per training run); the monitor keeps it out, and the
    events it writes that way still parse."""
    import subprocess
    import sys

    code = ("import sys; from gmem_jax.training.monitor import Monitor; m = Monitor(sys.argv[1], total_steps=1); "
            "m.write(1, {'loss': 2.5}); m.close(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert _tb_scalars(tmp_path / "tb") == [(1, "loss", 2.5)]
