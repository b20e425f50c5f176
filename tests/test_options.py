"""Options defined once and config files: a run's or a sweep's config.json, passed back with --config,
trains the same thing again; a YAML file gives options, flags after it override them; a bad file is
refused by name."""

import json
from pathlib import Path

import pytest
import torch

from lora_lab.cli import main
from lora_lab.files import read_safetensors
from lora_lab.sweep import read_rows, row_key

TIMING = ("seconds", "per_second", "memory", "run")  # what two runs of the same config may differ in


def _capture(monkeypatch) -> list:
    """Record the TrainConfig `lora-lab train` would run, without training."""
    import lora_lab.run

    seen = []

    def train(cfg, out, distributed=None):
        seen.append(cfg)
        raise ValueError("recorded")

    monkeypatch.setattr(lora_lab.run, "train", train)
    return seen


def _same_metrics(a: dict, b: dict) -> None:
    for key in a.keys() | b.keys():
        if not any(word in key for word in TIMING):
            assert a[key] == b[key], key


def test_a_runs_config_json_trains_the_same_run_again(tiny_bert_dir, letters_data, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    args = ["train", "--model", str(tiny_bert_dir), "--dataset", f"csv:{letters_data}", "--rank", "2", "--alpha", "3",
            "--targets", "query", "value", "--class-weights", "1,2", "--epochs", "2", "--batch-size", "4",
            "--lr", "1e-2", "--max-length", "16", "--max-steps", "6", "--seed", "7", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--out", str(first)]) == 0
    assert main(["train", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    config = json.loads((first / "config.json").read_text())
    assert config == json.loads((again / "config.json").read_text())
    assert config["targets"] == ["query", "value"] and config["alpha"] == 3.0 and config["class_weights"] == [1.0, 2.0]
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (first, again)]
    _same_metrics(metrics[0], metrics[1])
    tensors = [read_safetensors(d / "adapter.safetensors", "")[0] for d in (first, again)]
    assert tensors[0].keys() == tensors[1].keys()
    for name in tensors[0]:
        torch.testing.assert_close(tensors[0][name], tensors[1][name], rtol=0, atol=0)


def test_a_yaml_file_gives_options_and_flags_after_it_override(monkeypatch, tmp_path):
    seen = _capture(monkeypatch)
    config = tmp_path / "run.yaml"
    config.write_text("rank: 2\nlr: 0.01\ntargets: [query, value]\nschedule: linear\ntrain_head: false\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "a")]) == 2
    b_args = ["--rank", "4", "--targets", "key", "--out", str(tmp_path / "b")]
    assert main(["train", "--config", str(config), *b_args]) == 2
    assert main(["train", "--rank", "16", "--config", str(config), "--out", str(tmp_path / "c")]) == 2
    a, b, c = seen
    assert (a.rank, a.alpha, a.lr, a.targets, a.schedule, a.train_head) == (2, 4.0, 0.01, ["query", "value"],
                                                                            "linear", False)  # fmt: skip
    assert (b.rank, b.alpha, b.targets, b.lr) == (4, 8.0, ["key"], 0.01)  # alpha follows the rank given
    assert c.rank == 2  # a flag before the file is overridden by it


def test_print_config_writes_a_file_that_gives_the_same_config(monkeypatch, capsys, tmp_path):
    seen = _capture(monkeypatch)
    args = ["--dataset", "instructions", "--rank", "4", "--epochs", "1", "--no-mask-prompt", "--template", "chat",
            "--quantize", "nf4", "--targets", "q_proj", "v_proj", "--out", str(tmp_path / "a")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["train", *args, "--print_config"])
    assert exit_.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert main(["train", *args]) == 2 and main(["train", "--config", str(printed)]) == 2
    assert seen[0] == seen[1] and seen[0].model == "smollm2-135m" and seen[0].mask_prompt is False


@pytest.mark.parametrize(
    "text, said",
    [("rank: 2\nbatchsize: 4\n", "batchsize"), ("rank: eight\n", "rank"),
     ("schedule: cosin\n", "'cosin' not among choices"), ("dataset: sms-spma\n", "did you mean 'sms-spam'"),
     ("rank: [2\n", "did not find expected ',' or ']'")],
    ids=["unknown-key", "wrong-type", "bad-choice", "near-miss-dataset", "not-yaml"],
)  # fmt: skip
def test_a_bad_config_file_is_refused_by_name(text, said, monkeypatch, capsys, tmp_path):
    seen = _capture(monkeypatch)
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    try:
        code = main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    except SystemExit as exit_:  # refused while parsing, with the usage
        code = exit_.code
    assert code == 2 and not seen
    assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "run")])
    assert "missing.yaml" in capsys.readouterr().err


def test_a_sweeps_config_json_holds_every_list_and_runs_the_sweep_again(tiny_bert_dir, letters_data, tmp_path):
    out, again = tmp_path / "sweep", tmp_path / "again"
    args = ["sweep", "--model", str(tiny_bert_dir), "--dataset", f"csv:{letters_data}", "--epochs", "1",
            "--batch-size", "8", "--lr", "1e-2", "--max-length", "16", "--max-steps", "3", "--device", "cpu",
            "--targets", "query", "value", "--targets", "all-linear", "--seeds", "1"]  # fmt: skip
    assert main([*args, "--ranks", "1,2", "--out", str(out)]) == 0
    assert main([*args, "--ranks", "4", "--seeds", "2", "--targets", "query", "value", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ranks"] == [1, 2, 4] and config["seeds"] == [1, 2]
    assert config["targets"] == [["query", "value"], ["all-linear"]] and config["model"] == [str(tiny_bert_dir)]
    assert main(["sweep", "--config", str(out / "config.json"), "--out", str(again)]) == 0
    rows = {row_key(r): r for r in read_rows(out)}
    redone = {row_key(r): r for r in read_rows(again)}
    assert set(rows) <= set(redone)  # every point the directory held (and the product's other points)
    assert len(redone) == 3 * 2 * 2 and len(rows) == 2 * 2 * 1 + 1 * 1 * 2
    for key, row in rows.items():
        _same_metrics({k: v for k, v in row.items()}, {k: v for k, v in redone[key].items()})
    summary = (again / "summary.md").read_text()  # the model by its folder's name, not the CSV's absolute path
    assert str(tiny_bert_dir) not in summary


def test_train_and_sweep_take_the_same_options_from_one_definition():
    """Every TrainConfig field is an option of train; sweep takes the same ones but those a point sets."""
    import dataclasses

    from lora_lab.config import TrainConfig
    from lora_lab.options import build_parser

    parser = build_parser()
    subcommands = parser._subcommands_action._name_parser_map  # jsonargparse's own map of the commands
    dests = {name: {a.dest for a in subcommands[name]._actions} for name in ("train", "sweep")}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    points = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["point"]}
    assert fields <= dests["train"] and (fields - points) <= dests["sweep"]
    assert points == {"model", "rank", "alpha", "use_rslora", "use_dora", "init", "lr_ratio", "targets", "seed"}
    assert Path(parser.prog).name == "lora-lab"


def test_a_file_means_what_the_flags_mean(monkeypatch, tmp_path, capsys):
    """Found by attacking --config: a relative model path, full: true, bools as text, null where none is
    allowed, a flag undoing a file's bool, and a sweep's targets written as one list."""
    seen = _capture(monkeypatch)
    (tmp_path / "bert").mkdir()
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("model: bert\nfull: true\nuse_rslora: true\n")
    assert main(["train", "--config", str(config), "--out", "a"]) == 2
    assert main(["train", "--config", str(config), "--no-rslora", "--out", "b"]) == 2
    assert seen[0].model == str(tmp_path / "bert") and seen[0].balanced is False and seen[0].use_rslora is True
    assert seen[1].use_rslora is False  # a flag after the file undoes its true
    for text, said in (
        ("train_head: 'false'\n", "--train-head 'false': must be true or false"),
        ("schedule: null\n", "--schedule None: must be text"),
        ("targets: null\n", "--targets"),
    ):
        config.write_text(text)
        try:
            code = main(["train", "--config", str(config), "--out", "c"])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2 and len(seen) == 2 and said in capsys.readouterr().err, text

    import lora_lab.sweep

    points = []
    monkeypatch.setattr(
        lora_lab.sweep, "run_sweep", lambda base, p, *a, **k: points.append(p) or {"summary": False, "trained": 0}
    )
    for text, sets in (("targets: [query, value]\n", {"query+value"}), ("targets: query\n", {"query"}),
                       ("targets: [[query], [all-linear]]\n", {"query", "all-linear"})):  # fmt: skip
        config.write_text("model: [minilm-l6]\nranks: [1]\n" + text)
        assert main(["sweep", "--config", str(config), "--out", "s"]) == 0
        assert {p.targets for p in points[-1]} == sets, text
    config.write_text("model: [minilm-l6]\nranks: [1, 2]\nalphas: [3]\n")
    assert main(["sweep", "--config", str(config), "--alpha-ratio", "4", "--out", "s"]) == 2  # not alphas 3 silently


def test_a_sweeps_config_after_mixed_alpha_commands_still_names_every_point(tmp_path):
    from itertools import product

    from lora_lab.sweep import record_options

    commands = [{"ranks": [1, 2], "alphas": None, "alpha_ratio": 4.0},
                {"ranks": [2], "alphas": [3.0], "alpha_ratio": None},
                {"ranks": [1, 2, 4], "alphas": None, "alpha_ratio": 2.0}]  # fmt: skip
    ran = set()
    for options in commands:
        record_options(tmp_path, options)
        if options["alphas"]:
            ran |= set(product(options["ranks"], options["alphas"]))
        else:
            ran |= {(r, options["alpha_ratio"] * r) for r in options["ranks"]}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["alpha_ratio"] is None and ran <= set(product(saved["ranks"], saved["alphas"]))
    record_options(tmp_path / "x", {"ranks": [1], "alphas": None, "alpha_ratio": 2.0})
    record_options(tmp_path / "x", {"ranks": [4], "alphas": None, "alpha_ratio": 2.0})
    kept = json.loads((tmp_path / "x" / "config.json").read_text())
    assert kept["ranks"] == [1, 4] and kept["alpha_ratio"] == 2.0 and kept["alphas"] is None  # one ratio stays one
