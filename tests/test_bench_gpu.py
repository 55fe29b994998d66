"""scripts/bench_gpu.py end to end on the CPU: the tiny model, a few steps, every row and ratio printed (the
compiled rows and open_clip_train left out: compiling takes minutes on this CPU, open_clip_train a virtual
environment of its own)."""

import re
import sys
import tempfile

from tests.conftest import REPO

ROWS = ["bare loop, eager", "bare loop, compiled", "multimodal train, eager", "multimodal train, compiled",
        "open_clip_train, eager", "multimodal embed"]
RATIOS = ["ours / bare loop, eager", "ours / bare loop, compiled", "ours / open_clip_train, eager"]
MEASURED = {"bare loop, eager", "multimodal train, eager", "multimodal embed", "ours / bare loop, eager"}


def test_the_gpu_benchmark_runs_on_the_cpu_and_prints_every_row(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its shards and runs, in this test's folder
    import bench_gpu

    bench_gpu.main(["--accelerator", "cpu", "--model", "tiny", "--steps", "4", "--batch-size", "16", "--workers", "1",
                    "--synthetic", "--no-compile", "--no-open-clip"])
    out = capsys.readouterr().out
    assert "device: cpu" in out.splitlines()[0]
    for label in ROWS + RATIOS:
        line = next((line for line in out.splitlines() if line.strip().startswith(label)), None)
        assert line is not None, f"no row {label!r} in:\n{out}"
        value = line.strip()[len(label):].split()[0]
        if label in MEASURED:
            assert float(value.rstrip("x")) > 0, line
        else:
            assert value == "-", line
    assert "left out: --no-compile" in out and "left out: --no-open-clip" in out
    assert re.search(r"multimodal train, eager .* MFU +-$", out, re.MULTILINE)  # no peak known for a CPU


def test_a_row_that_fails_is_left_out_and_the_others_are_measured(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_gpu

    from multimodal import arch

    monkeypatch.setattr(bench_gpu, "bare", lambda setting: [10.0, 12.0])
    monkeypatch.setattr(bench_gpu, "ours", lambda setting, listing: sys.exit("multimodal train failed:\nboom"))
    setting = bench_gpu.Setting(arch.load("tiny"), 16, 4, 1, False, compile=False)
    windows = bench_gpu.measure(setting, bench_gpu.Shards("x", 64, "test"), False, False)
    assert windows["bare loop, eager"] == [10.0, 12.0]
    assert windows["multimodal train, eager"] == "failed, see stderr"
    assert "multimodal train, eager failed: multimodal train failed:\nboom" in capsys.readouterr().err
    assert bench_gpu.ratio("ours / bare loop, eager", windows["multimodal train, eager"],
                           windows["bare loop, eager"]).split()[-1] == "-"
