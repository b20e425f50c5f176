"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, each an optional extra, behind one
small interface (`Trackers`) that the run drives. None is used unless asked (`--report-to`).

What a tracked run holds: every optimizer step's train/loss, train/lr, train/grad_norm and
train/tokens_per_second (the tokens rank 0 read in the step over its seconds); every epoch's val/loss
(and val/accuracy) with train/epoch_loss; the final figures (val, test) at the last step; the run's
config as hyperparameters. In a sweep each point is a tracked run, grouped under the sweep:
TensorBoard writes each point's events in its run folder (`tensorboard --logdir SWEEP/runs` shows
them side by side, ranks in the HParams tab), MLflow nests the points under one parent run named for
the sweep, W&B puts them in a group of that name.

Where they write: TensorBoard in RUN/tensorboard; MLflow to MLFLOW_TRACKING_URI if set, else a local
store, sqlite:///DIR/mlflow.db (DIR: the sweep, or the run), experiment MLFLOW_EXPERIMENT_NAME or
"lora-lab" (`mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db`); W&B to the project WANDB_PROJECT
or "lora-lab" (WANDB_MODE=offline writes RUN/wandb for `wandb sync`). A resumed run goes on in the
same MLflow and W&B runs (their ids are kept in RUN/trackers.json)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .files import write_text

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name: the package to install
IDS = "trackers.json"  # in the run directory: the MLflow and W&B run ids, so a resumed run goes on in them


def check_tracker_names(names: Sequence[str]) -> None:
    """Refuse a tracker lora_lab does not know, with the name it may have meant."""
    from .targets import did_you_mean

    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--report-to {name}{did_you_mean(name, list(TRACKERS))}: use any of "
                             f"{', '.join(TRACKERS)}")  # fmt: skip


def _mlflow_client(home: Path):
    """MLflow's client on MLFLOW_TRACKING_URI, else on the local store sqlite:///HOME/mlflow.db."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db")


def check_trackers(names: Sequence[str]) -> None:
    """Refuse an unknown tracker, or one whose package is missing, before anything trains."""
    import importlib.util

    check_tracker_names(names)
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"--report-to {name} needs {TRACKERS[name]}: pip install 'lora-lab[{name}]' "
                             f"(or pip install {TRACKERS[name]})")  # fmt: skip


def sweep_name(sweep: Path) -> str:
    """A sweep as trackers group it: its folder's name and a digest of its path, so two sweeps of one
    name (every `lora-lab-sweep`) stay apart."""
    import hashlib

    path = str(sweep.resolve())
    return f"{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"


def finish_sweep(sweep: Path, names: Sequence[str]) -> None:
    """Mark the sweep's MLflow parent run finished (its last point is done)."""
    if "mlflow" not in names:
        return
    from filelock import FileLock

    home = sweep.resolve()
    with FileLock(str(home / ".mlflow.lock")):
        client = _mlflow_client(home)
        experiment = client.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lora-lab")
        found = client.search_runs([experiment.experiment_id], f"tags.lora_lab_sweep = '{home}'") if experiment else []
        for parent in found:
            client.set_terminated(parent.info.run_id, "FINISHED")


def _numbers(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) dict, keys joined by "/"."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix + key] = float(value)
    return out


def hyperparameters(config: dict) -> dict[str, str | int | float | bool]:
    """A config as trackers take hyperparameters: lists and None as text."""
    return {k: v if isinstance(v, str | int | float | bool) else json.dumps(v) for k, v in config.items()}


class _TensorBoard:
    def __init__(self, run: Path, params: dict, sweep: Path | None, ids: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.params = SummaryWriter(log_dir=str(run / "tensorboard")), hyperparameters(params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self, final: dict[str, float], ok: bool) -> None:
        if ok:  # the HParams tab: one row per run, the config beside its final figures
            self.writer.add_hparams(self.params, {f"hparams/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.close()


@contextlib.contextmanager
def _said_plainly(tracker: str) -> Iterator[None]:
    """A tracker that cannot start (a store it refuses, no login) as one line naming what to change."""
    try:
        yield
    except Exception as err:
        if isinstance(err, ValueError | OSError) and not type(err).__module__.startswith(("mlflow", "wandb")):
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"{tracker} could not start a run: {first}") from None


class _MLflow:
    def __init__(self, run: Path, params: dict, sweep: Path | None, ids: dict) -> None:
        from mlflow.entities import Param

        for noisy in ("mlflow.store.db.utils", "alembic"):  # the store's "creating tables" lines
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from filelock import FileLock

        home = (sweep or run).resolve()
        home.mkdir(parents=True, exist_ok=True)
        # one process at a time: the first makes the store's tables, and a sweep's shards start together
        with FileLock(str(home / ".mlflow.lock")), _said_plainly("MLflow"):
            self.client = _mlflow_client(home)
            self.client.search_experiments(max_results=1)  # the store made (its tables) here, under the lock
            if ids.get("mlflow"):
                self.id = ids["mlflow"]
                self.client.update_run(self.id, status="RUNNING")
                return
            experiment = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lora-lab")
            tags = {"mlflow.parentRunId": self._parent(experiment, sweep)} if sweep else {}
            self.id = self.client.create_run(experiment, run_name=run.name, tags=tags).info.run_id
        self.client.log_batch(self.id, params=[Param(k, str(v)) for k, v in hyperparameters(params).items()])
        ids["mlflow"] = self.id

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found else self.client.create_experiment(name)

    def _parent(self, experiment: str, sweep: Path) -> str:
        """The sweep's parent run: found by its tag, or made (the caller holds the store's lock)."""
        tag = str(sweep.resolve())
        found = self.client.search_runs([experiment], filter_string=f"tags.lora_lab_sweep = '{tag}'")
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")  # a sweep extended goes on
            return found[0].info.run_id
        parent = self.client.create_run(experiment, run_name=sweep.resolve().name, tags={"lora_lab_sweep": tag})
        return parent.info.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # MLflow's keys: letters, digits, _ - . / and spaces (a class may be "yes!")
        self.client.log_batch(self.id, metrics=[Metric(re.sub(r"[^\w\-./ ]", "_", k), v, now, step)
                                                for k, v in metrics.items()])  # fmt: skip

    def close(self, final: dict[str, float], ok: bool) -> None:
        self.client.set_terminated(self.id, "FINISHED" if ok else "FAILED")


class _WandB:
    def __init__(self, run: Path, params: dict, sweep: Path | None, ids: dict) -> None:
        import wandb

        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "lora-lab",
                group=sweep_name(sweep) if sweep else None,
                job_type="sweep point" if sweep else "train",
                name=run.name,
                config=params,
                dir=str(run),
                id=ids.get("wandb"),
                resume="allow" if ids.get("wandb") else None,
                reinit="create_new",
            )
        except wandb.errors.Error as err:
            raise ValueError(f"W&B could not start a run ({err}): `wandb login`, or WANDB_MODE=offline to write it "
                             f"under {run}/wandb for `wandb sync` later") from None  # fmt: skip
        ids["wandb"] = self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self, final: dict[str, float], ok: bool) -> None:
        self.run.summary.update(final)
        self.run.finish(exit_code=0 if ok else 1)


class Trackers:
    """The trackers a run reports to (none: every call does nothing)."""

    def __init__(self, names: Sequence[str] = (), run: Path | None = None, config: dict | None = None,
                 sweep: Path | None = None) -> None:  # fmt: skip
        self.items, self.last_seconds, self.final, self.run = [], None, {}, run
        if not names:
            return
        check_trackers(names)
        self.ids = json.loads((run / IDS).read_text()) if (run / IDS).is_file() else {}
        self.logged = (self.ids.get("last_step", 0), self.ids.get("last_epoch", 0))  # before an interruption
        params = dict(config or {})
        kinds = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}
        try:
            for name in names:
                self.items.append(kinds[name](run, params, sweep, self.ids))
        except BaseException:
            self.close(False)  # the trackers already started end as failed; their ids are kept for a retry
            raise
        self._save_ids()

    def step(self, row: dict) -> None:
        """One optimizer step of steps.csv."""
        if not self.items:
            return
        before = self.last_seconds if self.last_seconds is not None else (0.0 if row["step"] == 1 else None)
        self.last_seconds = row["seconds"]
        metrics = {"train/loss": row["loss"], "train/lr": row["lr"], "train/grad_norm": row["grad_norm"]}
        seconds = row["seconds"] - before if before is not None else 0.0  # a resumed run's first step: unknown
        if seconds > 0:
            metrics["train/tokens_per_second"] = row["tokens"] / seconds
        if row["step"] > self.logged[0]:  # a resumed run's steps since its checkpoint were logged already
            self._log(metrics, row["step"])
            self.ids["last_step"] = row["step"]

    def epoch(self, row: dict) -> None:
        """One epoch of history.csv: its validation."""
        if not self.items:
            return
        metrics = {"epoch": row["epoch"], "train/epoch_loss": row["train_loss"], "val/loss": row["val_loss"]}
        if "val_accuracy" in row:
            metrics["val/accuracy"] = row["val_accuracy"]
        if row["epoch"] > self.logged[1]:
            self._log(metrics, row["step"])
            self.ids["last_epoch"] = row["epoch"]

    def finish(self, metrics: dict, step: int) -> dict[str, float]:
        """The run's final figures (metrics.json's numbers), logged at its last step."""
        final = {k: v for k, v in _numbers(metrics).items() if k.startswith(("final_", "test", "val", "initial"))}
        self._log({f"final/{k}": v for k, v in final.items()}, step)
        self.final = final
        return final

    def close(self, ok: bool) -> None:
        for item in self.items:
            item.close(self.final, ok)
        if self.items:
            self._save_ids()
        self.items = []

    def _save_ids(self) -> None:
        """RUN/trackers.json: the tracked runs' ids and what they hold, for a resumed run to go on."""
        write_text(self.run / IDS, json.dumps(self.ids, indent=2) + "\n")

    def _log(self, metrics: dict, step: int) -> None:
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for item in self.items:
            item.log(metrics, step)
