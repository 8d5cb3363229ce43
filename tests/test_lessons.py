"""The lesson command: its data generators and loaders, and a quick smoke run of every part, fused and stock."""

import json

import pytest
import torch

from fastcore_kernels.lessons import human_numbers as hn
from fastcore_kernels.lessons.__main__ import main

from conftest import skip_unless_runnable


def test_number_words_match_the_course():
    assert hn.number_words(1) == "one"
    assert hn.number_words(15) == "fifteen"
    assert hn.number_words(40) == "forty"
    assert hn.number_words(101) == "one hundred one"
    assert hn.number_words(8000) == "eight thousand"
    assert hn.number_words(8001) == "eight thousand one"
    assert hn.number_words(9999) == "nine thousand nine hundred ninety nine"
    assert hn.number_words(7310) == "seven thousand three hundred ten"
    with pytest.raises(ValueError):
        hn.number_words(0)
    train, valid = hn.lines("train"), hn.lines("valid")
    assert len(train) == 8000 and len(valid) == 1999 and valid[0] == "eight thousand one"
    assert len(set(hn.tokens(train + valid))) == 30  # 29 number words and "."


def test_real_format_folder_and_stream_loader(tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(hn.lines("train")[:600]) + "\n")
    (tmp_path / "valid.txt").write_text("\n".join(["one", "two", "zillion"] * 200) + "\n")
    train = hn.read_lines(tmp_path, "train")
    assert train[:3] == ["one", "two", "three"]
    vocab = hn.Vocab(hn.tokens(train))
    ids = vocab.encode(hn.tokens(hn.read_lines(tmp_path, "valid")))
    assert (ids == 0).sum() == 200  # "zillion" is unknown
    loader = hn.StreamLoader(ids, bs=4, bptt=5)
    batches = list(loader)
    assert len(batches) == len(loader) > 1
    x0, y0 = batches[0]
    x1, _ = batches[1]
    assert x0.shape == (4, 5) and torch.equal(x0[:, 1:], y0[:, :-1])
    assert torch.equal(y0[:, -1], x1[:, 0])  # batch 2 continues batch 1, row by row
    with pytest.raises(FileNotFoundError):
        hn.read_lines(tmp_path / "missing", "train")


def test_lesson7_human_numbers_quick(tmp_path):
    skip_unless_runnable("cpu", "cpu")
    assert main(["lesson", "7", "--part", "human-numbers", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {(r["model"], r["kernels"]) for r in rows} == {(m, k) for m in hn.MODELS for k in ("fused", "stock")}
    for r in rows:
        assert 0.0 <= r["value"] <= 1.0 and r["sec_per_epoch"] > 0
    by = {(r["model"], r["kernels"]): r["value"] for r in rows}
    for m in hn.MODELS:  # same seed, same data: the fused run learns what the stock run learns
        assert by[(m, "fused")] == pytest.approx(by[(m, "stock")], abs=0.02)
    assert (tmp_path / "lesson7-human-numbers" / "loss_gru_fused.png").is_file()


def test_unknown_lesson_or_part():
    with pytest.raises(SystemExit, match="no parts"):
        main(["lesson", "99"])
    with pytest.raises(SystemExit, match="not 'nope'"):
        main(["lesson", "7", "--part", "nope"])
