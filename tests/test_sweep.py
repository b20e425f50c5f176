import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_lab.cli import main
from lora_lab.report import summarize
from lora_lab.sweep import Point, grid, read_rows, row_key, shard_from_env

REPO = Path(__file__).resolve().parents[1]


def _sweep_args(model: Path, data: Path, out: Path, ranks: str = "1,2,4", epochs: int = 2) -> list[str]:
    return [
        "sweep", "--model", str(model), "--dataset", f"csv:{data}", "--ranks", ranks, "--epochs", str(epochs),
        "--batch-size", "8", "--lr", "1e-2", "--max-length", "16", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def _keys(out: Path) -> list[tuple[str, ...]]:
    return [row_key(r) for r in read_rows(out)]


def test_grid_is_the_product_of_the_lists():
    points = grid(["a", "b"], [8, 4, 8], scalings=["standard", "rslora"], target_sets=["q+v", "all-linear"],
                  seeds=[1, 2])  # fmt: skip
    assert len(points) == 2 * 2 * 2 * 2 * 2 and len(set(points)) == len(points)
    assert [p.rank for p in points[:4]] == [8, 8, 4, 4] and {p.alpha / p.rank for p in points} == {2.0}
    crossed = grid(["a"], [4, 8], alphas=[16, 32])
    assert [(p.rank, p.alpha) for p in crossed] == [(4, 16.0), (4, 32.0), (8, 16.0), (8, 32.0)]
    assert Point("a", 8, 16.0, "standard", "all-linear", 1).key() == (
        "a", "8", "16", "standard", "all-linear", "lora", "kaiming", "1", "1"
    )  # fmt: skip
    for bad, message in [({"ranks": [0]}, "positive"), ({"scalings": ["dora"]}, "unknown scaling"),
                         ({"alphas": [-1]}, "alphas must be positive"),
                         ({"alphas": [float("nan")]}, "alphas must be positive")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            grid(["a"], **{"ranks": [4], **bad})


def test_shards(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert shard_from_env() == (1, 3)
    assert shard_from_env("2/4") == (2, 4)
    for bad in ("4/4", "1", "a/b"):
        with pytest.raises(ValueError, match="--shard takes I/N"):
            shard_from_env(bad)


def test_a_three_point_sweep_writes_csv_plot_and_summary(tiny_bert_dir, letters_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(_sweep_args(tiny_bert_dir, letters_data, out)) == 0
    printed = capsys.readouterr().out
    rows = read_rows(out)
    assert [int(r["rank"]) for r in rows] == [1, 2, 4] and all(r["status"] == "ok" for r in rows)
    assert [float(r["alpha"]) for r in rows] == [2.0, 4.0, 8.0]
    # each point's run directory holds its adapter and metrics; its trainable count is the CSV's
    for r in rows:
        run = out / r["run"]
        assert (run / "adapter.safetensors").is_file() and (run / "metrics.json").is_file()
    counts = [int(r["trainable_params"]) for r in rows]
    assert counts[1] - counts[0] == counts[0] - 130 > 0  # LoRA grows linearly in r; the 2-class head (130) does not
    assert (out / "sweep.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    chosen = _picked(summarize(rows, "classification")[0], "recommended")
    assert len(chosen) == 1 and f"recommended rank **r={chosen[0]}**" in summary and "recommended rank" in printed
    assert summary.count("| 1 | 2 |") == 1 and "95% interval" in summary and "baseline" in summary.lower()
    # what the adapters learned: spectra, similarities between the ranks, a recommended rank
    assert main(["analyze", str(out)]) == 0
    assert "recommended rank **r=" in capsys.readouterr().out
    spectra = list(csv.DictReader(open(out / "analysis_spectra.csv")))
    assert len(spectra) == 3 * 13  # 3 points x 13 adapted linears (2 layers x 6 and the pooler)
    assert all(float(s["effective_rank"]) <= int(s["rank"]) + 1e-6 for s in spectra)
    assert len(list(csv.DictReader(open(out / "analysis_similarity.csv")))) == 3 * 13  # pairs (1,2), (1,4), (2,4)
    assert (out / "analysis_similarity_r1_r4.png").is_file() and (out / "analysis_spectra.png").is_file()
    # run again: nothing trains, nothing changes
    before = (out / "sweep.csv").read_text()
    assert main(_sweep_args(tiny_bert_dir, letters_data, out)) == 0
    assert "3 finished already" in capsys.readouterr().out and (out / "sweep.csv").read_text() == before
    # more ranks extend the same sweep, and the summary and plot cover every row; other settings are refused
    assert main(_sweep_args(tiny_bert_dir, letters_data, out, ranks="8")) == 0
    assert [int(r["rank"]) for r in read_rows(out)] == [1, 2, 4, 8]
    summary = (out / "summary.md").read_text()
    assert "Rank sweep: 4 points" in summary
    assert sorted(line["rank"] for line in summarize(read_rows(out), "classification")[0]) == [1, 2, 4, 8]
    assert all(f" | {r} | {2 * r} | " in summary for r in (1, 2, 4, 8))
    assert main([*_sweep_args(tiny_bert_dir, letters_data, out), "--lr", "0.1"]) == 2
    assert "holds a sweep with other settings (lr 0.01 -> 0.1)" in capsys.readouterr().err


def _row(rank, seed, val, params=None, n="149", **extra):
    return dict(model="m", rank=str(rank), alpha=str(2 * rank), scaling="standard", targets="all-linear",
                seed=str(seed), status="ok", trainable_params=str(params or 100 * rank), val_accuracy=repr(val),
                val_scored=n, test_accuracy="0.9", test_f1="0.9", seconds="1", peak_memory_mib="1",
                **extra)  # fmt: skip


def _picked(table, mark):
    return [line["rank"] for line in table if mark in line["pick"]]


def test_best_rank_ties_go_to_fewer_parameters_also_for_means_over_seeds():
    """Rank 1 (140, 142 of 149) and rank 4 (141, 141): equal means, though fmean gives 0.9462999999999999
    for one and 0.9463 for the other; the tie goes to r=1."""
    table, why = summarize([_row(4, 1, 0.95, 400), _row(2, 1, 0.95, 200), _row(8, 1, 0.94, 800)], "classification")
    assert _picked(table, "best") == [2]
    rows = [_row(1, 1, 140 / 149), _row(1, 2, 142 / 149), _row(4, 1, 141 / 149), _row(4, 2, 141 / 149)]
    table, why = summarize(rows, "classification")
    assert _picked(table, "best") == [1] and _picked(table, "recommended") == [1]


def test_seeds_that_agree_exactly_do_not_make_the_noise_zero():
    """Two seeds that agree exactly at each rank: the noise is at least the binomial standard error of the
    validation accuracy, so one example more at r=64 does not beat r=1 (before: noise 0, r=64)."""
    rows = [_row(r, s, v / 149) for r, v in ((1, 141), (8, 141), (64, 142)) for s in (1, 2)]
    table, why = summarize(rows, "classification")
    assert _picked(table, "best") == [64] and _picked(table, "recommended") == [1]
    assert "r=1" in why[0] and "behind the best, r=64" in why[0] and "64x fewer trainable parameters" in why[0]
    assert "The metric alone would pick r=64" in why[0]
    line = next(line for line in table if line["rank"] == 1)
    assert line["val_accuracy_se"] == pytest.approx(math.sqrt(141 / 149 * 8 / 149 / 149))


def test_summary_marks_the_pareto_front_and_flags_weak_points(tmp_path):
    """200 rows' worth of a weak sweep: a rank that predicts one class, one no better than the baseline."""
    rows = [_row(2, 1, 0.6, n="40", val_baseline="0.6", val_classes_predicted="1"),
            _row(8, 1, 0.675, n="40", val_baseline="0.6", val_classes_predicted="2"),
            _row(16, 1, 0.65, n="40", val_baseline="0.6", val_classes_predicted="2")]  # fmt: skip
    table, why = summarize(rows, "classification")
    assert [line["pareto"] for line in table] == ["yes", "yes", ""]
    assert "predicts one class" in table[0]["flags"] and "no better than the baseline" in table[0]["flags"]
    assert table[1]["flags"] == "" and "Weak: r=2" in why[0]
    from lora_lab.report import write_summary

    write_summary(tmp_path, rows, "classification")
    text = (tmp_path / "summary.md").read_text()
    assert "60.00% on validation" in text and "95% interval" in text and (tmp_path / "sweep.png").is_file()


def test_each_model_is_compared_with_its_own_baseline():
    """Two models' untrained losses differ: each series names (and flags against) its own."""
    loss = dict(val_accuracy="", final_val_loss_se="0.01")
    rows = [dict(_row(r, 1, 0.0), model=m, final_val_loss=str(v), val_baseline=str(b), **loss)
            for m, b in (("a", 5.0), ("b", 3.0)) for r, v in ((4, 3.2), (8, 3.1))]  # fmt: skip
    table, why = summarize(rows, "causal-lm")
    assert "validation loss is 5.0000" in why[0] and "validation loss is 3.0000" in why[1]
    assert [line["flags"] for line in table] == ["", ""] + ["no better than the baseline"] * 2


def test_losses_are_compared_with_their_own_standard_error():
    rows = [
        dict(_row(r, 1, 0.0), val_accuracy="", final_val_loss=str(v), final_val_loss_se="0.02")
        for r, v in ((4, 0.83), (8, 0.81), (16, 0.80))
    ]
    table, why = summarize(rows, "causal-lm")
    assert _picked(table, "best") == [16] and _picked(table, "recommended") == [8]  # 0.01 behind, SE 0.028


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lora_lab.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def test_a_sweep_killed_mid_point_resumes_with_one_row_per_point(tiny_bert_dir, letters_data, tmp_path):
    out = tmp_path / "sweep"
    args = _sweep_args(tiny_bert_dir, letters_data, out, ranks="1,2,4", epochs=6)
    proc = _run_cli(args)
    deadline = time.time() + 120
    killed_in = None
    while time.time() < deadline and proc.poll() is None:
        checkpoints = list((out / "runs").glob("*/r2-*/checkpoint.pt")) if (out / "runs").is_dir() else []
        if checkpoints:  # point 2 has finished an epoch and not its run: kill it there
            proc.send_signal(signal.SIGKILL)
            killed_in = checkpoints[0].parent
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert killed_in is not None, "the sweep ended before it could be killed mid-point"
    assert [int(k[1]) for k in _keys(out)] == [1]  # only point 1 finished
    assert not (killed_in / "metrics.json").exists()
    resumed = _run_cli(args)
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    assert "1 finished already" in log and "resuming" in log  # point 2 goes on from its checkpoint
    keys = _keys(out)
    assert [int(k[1]) for k in keys] == [1, 2, 4] and len(set(keys)) == 3
    assert (out / "summary.md").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_split_the_points_into_one_csv(tiny_bert_dir, letters_data, tmp_path):
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "lora_lab.cli", *_sweep_args(tiny_bert_dir, letters_data, out, ranks="1,2,4,8", epochs=1),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout + done.stderr
    assert "(shard 0/2): 4 points, 2 here" in log and "(shard 1/2): 4 points, 2 here" in log
    rows = read_rows(out)
    assert sorted(int(r["rank"]) for r in rows) == [1, 2, 4, 8] and len(set(map(row_key, rows))) == 4
    assert (out / "summary.md").is_file() and (out / "sweep.png").is_file()
    assert len((out / "sweep.csv").read_text().splitlines()) == 5  # the header and four rows, nothing interleaved
    assert not list(out.glob(".sweep.csv.*"))  # no temporary file left behind


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "lora_lab.cli", *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("one", [["--batch-size", "4", "--grad-accum", "2"], ["--batch-size", "8", "--class-weights",
                                 "1,3"]], ids=["accumulated", "class-weighted-big-batch"])  # fmt: skip
def test_ddp_over_two_processes_equals_one_process(one, tiny_bert_dir, letters_data, tmp_path):
    """`lora-lab train` under torchrun: two gloo processes, each a batch of 4, trains the same adapter
    as one process taking the same 8 rows per step, in two accumulated batches or in one (with class
    weights: the step divides by the weights of all 8 rows, over both processes)."""
    from lora_lab.files import read_safetensors

    common = ["--model", str(tiny_bert_dir), "--dataset", f"csv:{letters_data}", "--rank", "4", "--epochs", "1",
              "--lr", "1e-2", "--max-length", "16", "--max-steps", "5", "--device", "cpu"]  # fmt: skip
    weights = one[one.index("--class-weights") :] if "--class-weights" in one else []
    done = _torchrun(["train", *common, "--batch-size", "4", *weights, "--out", str(tmp_path / "ddp")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert main(["train", *common, *one, "--out", str(tmp_path / "one")]) == 0
    ddp, _ = read_safetensors(tmp_path / "ddp" / "adapter.safetensors", "")
    one, _ = read_safetensors(tmp_path / "one" / "adapter.safetensors", "")
    assert ddp.keys() == one.keys()
    moved = 0
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=0, atol=1e-5)
        moved += int(name.endswith("lora.B") and one[name].abs().sum() > 0)
    assert moved > 0  # the adapters trained (B left zero)
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "one")]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 5


def test_sweep_ddp_trains_each_point_on_every_process(tiny_bert_dir, letters_data, tmp_path):
    out = tmp_path / "sweep"
    done = _torchrun([*_sweep_args(tiny_bert_dir, letters_data, out, ranks="1,2", epochs=1), "--ddp"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [int(r["rank"]) for r in read_rows(out)] == [1, 2] and (out / "summary.md").is_file()


def test_run_names_are_unique_and_paths_are_one_model(tmp_path):
    (tmp_path / "bert").mkdir()
    long = "+".join(["attention.self.query", "attention.self.key", "attention.self.value"])
    points = grid([str(tmp_path / "bert"), str(tmp_path / "bert") + "/"], [4], target_sets=[long, long + "+x"])
    assert len(points) == 2  # a trailing slash names the same model
    assert len({p.run_name() for p in points}) == 2  # target sets that agree on their first 60 characters
    ratio = grid(["m"], [1, 3], alpha_ratio=0.1)
    assert [p.key()[2] for p in ratio] == ["0.1", "0.3"]  # not 0.30000000000000004


def test_summary_with_a_failed_seed_keeps_its_columns_and_skips_that_rank():
    def row(rank, seed, val, status="ok"):
        return dict(model="m", rank=str(rank), alpha=str(2 * rank), scaling="standard", targets="all-linear",
                    seed=str(seed), status=status, trainable_params=str(100 * rank), val_accuracy=str(val),
                    test_accuracy=str(val), test_f1="0.9", seconds="1", peak_memory_mib="1")  # fmt: skip

    rows = [row(4, 1, 0.90), row(4, 2, 0.0, "failed: the loss is nan"), row(8, 1, 0.86), row(8, 2, 0.89)]
    table, best = summarize(rows, "classification")
    assert [set(line) for line in table][0] == set(table[1])  # the same columns on every line
    assert [(line["rank"], line["seeds"], line["failed"]) for line in table] == [(4, 1, 1), (8, 2, 0)]
    assert _picked(table, "best") == [8] and "not candidates" in best[0]
    # alphas crossed with the ranks: one series per alpha, even when alpha / r is a float like 0.3
    crossed = [dict(row(r, 1, 0.9), alpha=a) for r in (1, 3) for a in ("0.3", "0.9")]
    assert {line["series"] for line in summarize(crossed, "classification")[0]} == {"alpha 0.3", "alpha 0.9"}


def test_a_failed_first_command_locks_no_settings_in(tiny_bert_dir, letters_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    bad = _sweep_args(tiny_bert_dir, tmp_path / "letters-typo.csv", out, ranks="1", epochs=1)
    assert main(bad) == 2 and "no such file" in capsys.readouterr().err
    assert not (out / "sweep.json").exists()
    assert main(_sweep_args(tiny_bert_dir, letters_data, out, ranks="1", epochs=1)) == 0
    assert (out / "sweep.json").is_file()


def test_sweep_and_analyze_errors_are_one_clear_line(tiny_bert_dir, letters_data, tmp_path, capsys):
    for args, message in [
        (["sweep", "--seeds", "a"], "--seeds takes whole numbers such as 8,16,64; got 'a'"),
        (["sweep", "--alphas", "x"], "--alphas takes numbers such as 8,16,32.5; got 'x'"),
        (["sweep", "--epochs", "0"], "--epochs 0"),
        (["analyze", str(tmp_path)], "is not a lora-lab sweep directory"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    out = tmp_path / "sweep"
    assert main(_sweep_args(tiny_bert_dir, letters_data, out, ranks="1,2", epochs=1)) == 0
    import shutil

    shutil.rmtree(out / read_rows(out)[0]["run"])
    assert main(["analyze", str(out)]) == 2
    assert "holds no adapter, though sweep.csv lists it: delete its row" in capsys.readouterr().err


def test_every_target_set_is_checked_before_the_first_point_trains(tiny_bert_dir, letters_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = _sweep_args(tiny_bert_dir, letters_data, out, ranks="1")
    assert main([*args, "--targets", "query", "--targets", "q_proj"]) == 2
    err = capsys.readouterr().err
    assert "--targets q_proj on" in err and "match no module" in err and "query" in err
    assert not (out / "runs").exists()  # nothing trained
    (tmp_path / "file").write_text("x")
    assert main([*_sweep_args(tiny_bert_dir, letters_data, tmp_path / "file", ranks="1")]) == 2
    assert "is a file; a sweep writes a directory" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_bert_dir), "--dataset", f"csv:{letters_data}", "--out",
                 str(tmp_path / "file")]) == 2  # fmt: skip
    assert "is a file; a run writes a directory" in capsys.readouterr().err


def test_a_failed_point_keeps_its_whole_reason_and_csv_paths_are_absolute(tiny_bert_dir, letters_data, tmp_path,
                                                                           monkeypatch):  # fmt: skip
    import lora_lab.sweep as sweep_module
    from lora_lab.loop import TrainingError

    def fail(cfg, out, distributed=False, sweep=None):
        raise TrainingError("nothing to learn in epoch 1: every batch was skipped (--max-length 2 cuts off every "
                            "response); raise --max-length")  # fmt: skip

    monkeypatch.setattr("lora_lab.run.train", fail)
    monkeypatch.chdir(letters_data.parent)
    out = tmp_path / "sweep"
    args = _sweep_args(tiny_bert_dir, Path(letters_data.name), out, ranks="1")
    assert main(args) == 0
    assert read_rows(out)[0]["status"].endswith("cuts off every response); raise --max-length")
    settings = json.loads((out / sweep_module.SETTINGS).read_text())
    assert settings["dataset"] == f"csv:{letters_data.resolve()}"


def test_sweeps_recorded_before_processes_per_point_still_resume(tmp_path):
    import json

    from lora_lab.config import TrainConfig
    from lora_lab.sweep import check_settings, sweep_settings

    settings = sweep_settings(TrainConfig(lr=0.01))
    old = {k: v for k, v in settings.items() if k not in ("processes_per_point", "bucket")}
    (tmp_path / "sweep.json").write_text(json.dumps(old))  # recorded before those two settings existed
    check_settings(tmp_path, settings)  # an old sweep: one process per point, no bucketing
    with pytest.raises(ValueError, match="processes_per_point 1 -> 2"):
        check_settings(tmp_path, {**settings, "processes_per_point": 2})


def test_variants_inits_and_lr_ratios_are_series_of_one_sweep(tiny_bert_dir, letters_data, tmp_path, capsys):
    """--variants lora,dora --inits gaussian,pissa: one series per combination in the CSV, the summary
    and the plot, the best series named with its uncertainty; the same command again adds nothing."""
    out = tmp_path / "sweep"
    args = [*_sweep_args(tiny_bert_dir, letters_data, out, ranks="1,4", epochs=1), "--variants", "lora,dora",
            "--inits", "gaussian,pissa"]  # fmt: skip
    assert main(args) == 0
    rows = read_rows(out)
    assert sorted({(r["variant"], r["init"], r["lr_ratio"]) for r in rows}) == [
        ("dora", "gaussian", "1"), ("dora", "pissa", "1"), ("lora", "gaussian", "1"), ("lora", "pissa", "1"),
    ]  # fmt: skip
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    dora = [int(r["trainable_params"]) for r in rows if r["variant"] == "dora"]
    lora = [int(r["trainable_params"]) for r in rows if r["variant"] == "lora"]
    assert all(d > p for d, p in zip(sorted(dora), sorted(lora), strict=True))  # the magnitudes
    summary = (out / "summary.md").read_text()
    assert summary.count("recommended rank **r=") == 4 and "Best series: **" in summary
    assert "dora, pissa" in summary and "lora, gaussian" in summary
    assert main(["analyze", str(out)]) == 0  # DoRA's updates read with the base model's weights, no warning
    spectra = (out / "analysis_spectra.csv").read_text()
    assert spectra.count("dora") >= 2 * 6  # every DoRA point's modules
    runs = sorted(p.name for p in (out / "runs").glob("*/*"))
    capsys.readouterr()
    assert main(args) == 0
    assert "8 finished already" in capsys.readouterr().out
    assert len(read_rows(out)) == 8 and sorted(p.name for p in (out / "runs").glob("*/*")) == runs


def test_a_csv_from_before_the_variant_columns_reads_as_plain_lora(tmp_path):
    """Sweeps written before variant / init / lr_ratio existed: their rows are LoRA, kaiming, ratio 1,
    their points count as finished and keep their run directories."""
    import hashlib

    from lora_lab.files import write_csv

    old_columns = ["model", "rank", "alpha", "scaling", "targets", "seed", "status", "run"]
    values = ["m", "4", "8", "standard", "all-linear", "1", "ok", "x"]
    write_csv(tmp_path / "sweep.csv", [dict(zip(old_columns, values, strict=True))], old_columns)
    (row,) = read_rows(tmp_path)
    assert row_key(row) == Point("m", 4, 8.0, "standard", "all-linear", 1).key()
    digest = hashlib.sha1("\0".join(["m", "4", "8", "standard", "all-linear", "1"]).encode()).hexdigest()[:8]
    assert Point("m", 4, 8.0, "standard", "all-linear", 1).run_name() == f"m/r4-a8-standard-all-linear-s1-{digest}"


NO_POSIX = """
import sys

import psutil  # before the block: on Linux psutil itself uses resource, on Windows it does not

sys.modules["fcntl"] = None  # as on Windows: importing them fails
sys.modules["resource"] = None
import multiprocessing
from pathlib import Path

import lora_lab  # the whole package imports
from lora_lab.params import _peak_without_proc
from lora_lab.sweep import COLUMNS, KEY_COLUMNS, append_row, locked, read_rows


def write(out, first):
    sys.modules["fcntl"] = None
    sys.modules["resource"] = None
    for i in range(first, first + 15):
        with locked(Path(out)):
            append_row(Path(out), {k: str(i) for k in KEY_COLUMNS})


if __name__ == "__main__":
    out = sys.argv[1]
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=write, args=(out, first)) for first in (0, 100)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    rows = read_rows(out)
    print(len(rows), len({r["model"] for r in rows}), _peak_without_proc() > 10, lora_lab.__version__)
"""


def test_the_package_and_a_sweep_with_two_writers_run_without_fcntl_and_resource(tmp_path):
    """Windows has neither module: the package imports, two processes append to one sweep.csv without
    losing a row (filelock), and peak memory is read another way (psutil)."""
    import subprocess
    import sys

    script = tmp_path / "no_posix.py"
    script.write_text(NO_POSIX)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "sweep")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["30", "30", "True"], done.stdout


def test_a_summary_names_local_models_by_as_few_folder_names_as_tell_them_apart():
    from lora_lab.report import model_names

    names = model_names(["/a/b/bert", "/c/d/bert", "/x/y/gpt", "minilm-l6", "/x/y/gpt", "/z/minilm-l6"])
    assert names == {"/a/b/bert": "b/bert", "/c/d/bert": "d/bert", "/x/y/gpt": "gpt", "minilm-l6": "minilm-l6",
                     "/z/minilm-l6": "z/minilm-l6"}  # fmt: skip
    assert model_names(["/w/gpt2-124m", "/a/b", "/c/a/b"]) == {
        "/w/gpt2-124m": "w/gpt2-124m",
        "/a/b": "a/b",
        "/c/a/b": "c/a/b",
    }  # gpt2-124m: the registry's
