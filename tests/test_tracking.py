"""--report-to: what TensorBoard, MLflow and W&B (offline) hold after a run and a sweep, read back with
their own readers (tensorboard's event reader, MlflowClient on the local store, W&B's protobuf records)
and compared with the run's own steps.csv, history.csv and metrics.json."""

import csv
import json
from pathlib import Path

import pytest

from lora_lab.cli import main
from lora_lab.tracking import sweep_name

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch):
    """No network: W&B offline, MLflow on its default local store."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _args(model: Path, data: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", f"csv:{data}", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2",
            "--max-length", "16", "--device", "cpu", "--report-to", "tensorboard,mlflow,wandb", *extra]  # fmt: skip


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _wandb_records(run: Path) -> list:
    """The records of a run's offline .wandb file: a LevelDB-style log (32 KiB blocks, each record a
    7-byte header: checksum, length, type 1 full / 2 first / 3 middle / 4 last) after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, records, pending = path.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(records) -> dict[str, dict[int, float]]:
    history: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for key, value in items.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[int(items["_step"])] = value
    return history


def test_a_run_reports_every_step_epoch_and_its_config_to_each_tracker(tiny_bert_dir, letters_data, tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    assert main(["train", *_args(tiny_bert_dir, letters_data, "--rank", "2"), "--out", str(run)]) == 0
    steps, epochs = _csv(run / "steps.csv"), _csv(run / "history.csv")
    metrics = json.loads((run / "metrics.json").read_text())
    losses = {int(r["step"]): float(r["loss"]) for r in steps}
    val = {int(r["step"]): float(r["val_loss"]) for r in epochs}
    assert len(losses) == metrics["steps"] > 4 and len(val) == 2

    board = _tensorboard(run / "tensorboard")
    assert board["train/loss"] == pytest.approx(losses, rel=1e-6) and board["val/loss"] == pytest.approx(val, rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_second", "val/accuracy"} <= set(board)
    assert board["final/test_loss"] == pytest.approx({metrics["steps"]: metrics["test_loss"]}, rel=1e-6)

    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.data.params["rank"] == "2" and found.data.params["targets"] == "all-linear"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train/loss")}
    assert history == pytest.approx(losses, rel=1e-9)
    assert found.data.metrics["final/test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])

    records = _wandb_records(run)
    wandb_history = _wandb_history(records)
    assert wandb_history["train/loss"] == pytest.approx(losses, rel=1e-9)
    assert wandb_history["val/loss"] == pytest.approx(val, rel=1e-9)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in start.config.update}
    assert config["rank"] == 2 and config["lr"] == 0.01 and config["data_path"] is None


def test_a_sweep_is_one_tracked_run_per_point_grouped_under_the_sweep(tiny_bert_dir, letters_data, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "my-sweep"
    args = ["sweep", *_args(tiny_bert_dir, letters_data, "--ranks", "1,2", "--max-steps", "2"), "--out", str(out)]
    assert main(args) == 0
    runs = sorted(p.parent for p in out.glob("runs/*/*/config.json"))  # runs/MODEL/POINT
    assert len(runs) == 2 and all(_tensorboard(r / "tensorboard")["train/loss"] for r in runs)
    summary = (out / "summary.md").read_text()  # the model by its folder's name, not the CSV's absolute path
    assert f"- {tiny_bert_dir.name}: recommended rank" in summary and str(tiny_bert_dir) not in summary

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "my-sweep" and len(found) == 3 and parent.info.status == "FINISHED"
    assert sorted(c.data.params["rank"] for c in children) == ["1", "2"]
    assert sorted(c.info.run_name for c in children) == [r.name for r in runs]

    for run in runs:
        (start,) = [r.run for r in _wandb_records(run) if r.WhichOneof("record_type") == "run"]
        assert start.run_group == sweep_name(out) and start.run_group.startswith("my-sweep-")  # apart from others
        assert start.display_name == run.name


def test_an_unknown_or_missing_tracker_is_refused_before_training(monkeypatch, tiny_bert_dir, letters_data, tmp_path,
                                                                    capsys):  # fmt: skip
    args = ["train", "--model", str(tiny_bert_dir), "--dataset", f"csv:{letters_data}", "--out", str(tmp_path / "r")]
    assert main([*args, "--report-to", "tensorbord"]) == 2
    assert "did you mean 'tensorboard'" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main([*args, "--report-to", "wandb"]) == 2
    assert "pip install 'lora-lab[wandb]'" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_resumed_run_goes_on_in_the_same_tracked_runs(tiny_bert_dir, letters_data, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lora_lab import data as D

    run = tmp_path / "run"
    args = ["train", *_args(tiny_bert_dir, letters_data, "--rank", "2", "--seed", "5"), "--out", str(run)]
    real_batches = D.batches

    def stop_in_epoch_2(rows, batch_size, collate, shuffle, seed=0, bucket=False):
        if shuffle and seed == 5 + 1:
            raise KeyboardInterrupt  # Ctrl-C in the second epoch
        return real_batches(rows, batch_size, collate, shuffle, seed, bucket)

    monkeypatch.setattr(D, "batches", stop_in_epoch_2)
    assert main(args) == 130
    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    (stopped,) = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    assert stopped.info.status == "FAILED"
    monkeypatch.setattr(D, "batches", real_batches)
    assert main(args) == 0
    (found,) = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    steps = {int(r["step"]): float(r["loss"]) for r in _csv(run / "steps.csv")}
    logged = client.get_metric_history(found.info.run_id, "train/loss")
    history = {m.step: m.value for m in logged}
    assert len(logged) == len(steps)  # the steps logged before the interruption are not logged again
    assert found.info.run_id == stopped.info.run_id and found.info.status == "FINISHED"
    assert history == pytest.approx(steps, rel=1e-9) and _tensorboard(run / "tensorboard")["train/loss"] == \
        pytest.approx(steps, rel=1e-6)  # fmt: skip
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and len({f.name for f in files}) == 1  # two sessions of one W&B run id


def test_a_tracker_that_cannot_start_ends_the_others_and_a_retry_reuses_them(tiny_bert_dir, letters_data, tmp_path,
                                                                              monkeypatch, capsys):  # fmt: skip
    import wandb
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    args = ["train", *_args(tiny_bert_dir, letters_data, "--max-steps", "2"), "--report-to", "mlflow,wandb",
            "--out", str(run)]  # fmt: skip

    def no_login(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", no_login)
    assert main(args) == 2
    assert "W&B could not start a run (api_key not configured" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    (failed,) = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    assert failed.info.status == "FAILED"
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(args) == 0
    (found,) = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    assert found.info.run_id == failed.info.run_id and found.info.status == "FINISHED"


def test_class_names_mlflow_refuses_as_keys_are_logged_under_safe_keys(tiny_bert_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    rows = [{"text": " ".join("abcz"[(i + k) % 4] for k in range(4)), "label": ["yes!", "no?"][i % 2]}
            for i in range(60)]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_bert_dir), "--dataset", f"jsonl:{tmp_path / 'd.jsonl'}", "--epochs", "1",
            "--max-steps", "2", "--device", "cpu", "--report-to", "mlflow", "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    client = MlflowClient(f"sqlite:///{run}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    assert found.info.status == "FINISHED" and "final/test/per_class/no_/precision" in found.data.metrics


def test_a_sweep_under_torchrun_reports_every_point_to_one_store(tiny_bert_dir, letters_data, tmp_path):
    """Two processes, a point each, start together on a new MLflow store (its tables made once)."""
    from mlflow.tracking import MlflowClient
    from test_sweep import _torchrun

    out = tmp_path / "sweep"
    done = _torchrun(["sweep", *_args(tiny_bert_dir, letters_data, "--ranks", "1,2", "--max-steps", "2"),
                      "--report-to", "mlflow", "--out", str(out)])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    found = client.search_runs([client.get_experiment_by_name("lora-lab").experiment_id])
    assert len(found) == 3 and sorted(r.data.params.get("rank", "-") for r in found) == ["-", "1", "2"]
