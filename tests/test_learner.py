"""The Learner: training loop, schedules, freezing, lr_find, persistence, callbacks, metrics, interpretation."""

import math

import pytest
import torch
from torch import nn

import fastcore_kernels as fck
from fastcore_kernels.learner import (
    Callback, ClassificationInterpretation, DataLoaders, EarlyStopping, GradientClip, Learner, MixedPrecision,
    NonFiniteLossError, SaveModel, TensorLoader, Timer, accuracy, accuracy_multi, dice, error_rate, exp_rmspe,
    fbeta, grad_cam, hook_output, hook_outputs, load_learner, mse, rmse, sched_cos,
)
from fastcore_kernels.learner.callbacks import EVENTS


def linear_data(n=512, seed=0, a=3.0, b=-2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g)
    y = a * x + b + 0.01 * torch.randn(n, 1, generator=g)
    return x, y


def regression_learner(tmp_path=None, kernels="fused", seed=0, **kw):
    torch.manual_seed(seed)
    x, y = linear_data(seed=seed)
    dls = DataLoaders.from_tensors((x[:448], y[:448]), (x[448:], y[448:]), batch_size=32, device="cpu", seed=seed)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    kw.setdefault("progress", False)
    return Learner(dls, model, nn.MSELoss(), kernels=kernels, path=tmp_path or ".", **kw)


def classification_learner(tmp_path=None, n_cls=3, seed=0, **kw):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_cls, 2, generator=g) * 3
    y = torch.randint(0, n_cls, (600,), generator=g)
    x = centers[y] + torch.randn(600, 2, generator=g)
    dls = DataLoaders.from_tensors((x[:480], y[:480]), (x[480:], y[480:]), batch_size=32, device="cpu", seed=seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_cls))
    kw.setdefault("progress", False)
    return Learner(dls, model, nn.CrossEntropyLoss(), path=tmp_path or ".", **kw)


@pytest.mark.parametrize("kernels,opt_func", [("fused", fck.FusedAdam), ("stock", fck.FusedAdam),
                                               ("fused", torch.optim.SGD)])
def test_regression_converges(kernels, opt_func):
    learn = regression_learner(kernels=kernels, opt_func=opt_func, lr=1e-2, wd=0.0)
    if opt_func is torch.optim.SGD:
        learn.fit(8, lr=0.05)
    else:
        learn.fit_one_cycle(8, 3e-2)
    assert learn.recorder.value("valid_loss") < 0.02
    expected = torch.optim.AdamW if kernels == "stock" and opt_func is fck.FusedAdam else opt_func
    assert type(learn.opt) is expected


def test_one_cycle_schedule_matches_closed_form():
    learn = regression_learner()
    lr_max, div, div_final, pct_start, moms = 1e-2, 25.0, 1e5, 0.25, (0.95, 0.85, 0.95)
    learn.fit_one_cycle(3, lr_max, div=div, div_final=div_final, pct_start=pct_start, moms=moms)
    n = len(learn.dls.train)
    assert len(learn.recorder.lrs) == 3 * n
    for k, (lr, mom) in enumerate(zip(learn.recorder.lrs, learn.recorder.moms)):
        pct = k / (3 * n)
        if pct <= pct_start:
            p = pct / pct_start
            want_lr = lr_max / div + (1 + math.cos(math.pi * (1 - p))) * (lr_max - lr_max / div) / 2
            want_mom = moms[0] + (1 + math.cos(math.pi * (1 - p))) * (moms[1] - moms[0]) / 2
        else:
            p = (pct - pct_start) / (1 - pct_start)
            want_lr = lr_max + (1 + math.cos(math.pi * (1 - p))) * (lr_max / div_final - lr_max) / 2
            want_mom = moms[1] + (1 + math.cos(math.pi * (1 - p))) * (moms[2] - moms[1]) / 2
        assert lr == pytest.approx(want_lr, rel=1e-12), k
        assert mom == pytest.approx(want_mom, rel=1e-12), k
    assert sched_cos(1.0, 0.0, 0.5) == pytest.approx(0.5)


def _two_group_learner(**kw):
    learn = classification_learner(**kw)
    m = learn.model
    learn.splitter = lambda model: [list(model[0].parameters()) + list(model[1].parameters()),
                                    list(model[3].parameters())]
    return learn


def test_freeze_trains_only_the_head_and_norm_layers():
    learn = _two_group_learner()
    body_w = learn.model[0].weight.detach().clone()
    head_w = learn.model[3].weight.detach().clone()
    bn_w = learn.model[1].weight.detach().clone()
    learn.freeze()
    assert not learn.model[0].weight.requires_grad and learn.model[1].weight.requires_grad
    learn.fit(1, lr=1e-2)
    assert torch.equal(learn.model[0].weight, body_w)
    assert not torch.equal(learn.model[3].weight, head_w)
    assert not torch.equal(learn.model[1].weight, bn_w)  # train_bn: norm layers keep learning
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())
    with pytest.raises(ValueError, match="freeze all"):
        learn.freeze_to(2)


def test_params_the_user_froze_stay_frozen():
    learn = classification_learner()
    learn.model[0].weight.requires_grad_(False)
    w = learn.model[0].weight.detach().clone()
    learn.fit(1, lr=1e-2)
    assert not learn.model[0].weight.requires_grad and torch.equal(learn.model[0].weight, w)


def test_discriminative_lrs_and_no_decay_groups():
    learn = classification_learner()
    m = learn.model
    learn.splitter = lambda model: [list(model[0].parameters()), list(model[1].parameters()),
                                    list(model[3].parameters())]
    learn.create_opt()
    learn.set_hypers(lr=slice(1e-4, 1e-2), wd=0.1)
    by_group = {}
    for g in learn.opt.param_groups:
        by_group.setdefault(g["layer_group"], []).append(g)
    for i, want in enumerate([1e-4, 1e-3, 1e-2]):
        assert all(g["lr"] == pytest.approx(want) for g in by_group[i])
    ids = {id(p): g["weight_decay"] for g in learn.opt.param_groups for p in g["params"]}
    assert ids[id(m[0].weight)] == 0.1 and ids[id(m[0].bias)] == 0.0 and ids[id(m[1].weight)] == 0.0
    learn.set_hypers(lr=slice(1e-2))
    assert [by_group[i][0]["lr"] for i in range(3)] == pytest.approx([1e-3, 1e-3, 1e-2])
    for bad in (slice(1e-2, 1e-4), slice(None, None), slice(1e-4, 1e-2, 2), [1e-3, 1e-3]):
        with pytest.raises(ValueError):
            learn.set_hypers(lr=bad)


def test_lr_find_restores_model_and_optimizer(tmp_path):
    learn = classification_learner(tmp_path)
    learn.fit(1, lr=1e-3)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in learn.opt.state[learn.model[0].weight].items()}
    res = learn.lr_find(num_it=60, fname=tmp_path / "lr_find.png")
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in learn.opt.state[learn.model[0].weight].items():
        assert torch.equal(v, opt_before[k]), k
    assert 1e-7 <= res.valley <= 10 and 1e-8 <= res.minimum <= 1 and 1e-7 <= res.steep <= 10
    assert res.plot.exists() and res.plot.stat().st_size > 0
    assert len(res.lrs) <= 60 and res.lrs == sorted(res.lrs)


def test_save_load_and_export_round_trip(tmp_path):
    learn = classification_learner(tmp_path)
    learn.fit(2, lr=1e-2)
    x = learn.dls.valid.tensors[0][:7]
    preds = learn.predict(x, batched=True)
    path = learn.save("stage1")
    assert path.exists()
    other = classification_learner(tmp_path, seed=1)
    other.load("stage1")
    for a, b in zip(other.model.parameters(), learn.model.parameters()):
        assert torch.equal(a, b)
    assert other.opt is not None and len(other.opt.state) == len(learn.opt.state)
    learn.export("export.pkl")
    inf = load_learner(tmp_path / "export.pkl")
    got = inf.predict(x, batched=True)
    assert torch.equal(got[0], preds[0]) and torch.equal(got[1], preds[1])
    one = inf.predict(x[0])
    assert one[0].dim() == 0 and one[1].shape == (3,)
    with pytest.raises(RuntimeError, match="no data"):
        inf.fit(1)


def test_callbacks_fire_in_order():
    seen = []

    class Log(Callback):
        def __call__(self, event):
            seen.append(event)

    learn = regression_learner()
    learn.dls = DataLoaders(TensorLoader(*linear_data(64), batch_size=32), TensorLoader(*linear_data(16), batch_size=16))
    learn.fit(1, cbs=[Log()])
    batch = ["before_batch", "after_pred", "after_loss", "before_backward", "after_backward", "before_step",
             "after_step", "after_batch"]
    valid_batch = ["before_batch", "after_pred", "after_loss", "after_batch"]
    assert seen == (["before_fit", "before_epoch", "before_train"] + batch * 2 + ["after_train", "before_validate"]
                    + valid_batch + ["after_validate", "after_epoch", "after_fit"])
    assert set(seen) <= set(EVENTS)


def test_mixed_precision_bf16_on_cpu():
    learn = classification_learner(cbs=[MixedPrecision()])
    learn.fit_one_cycle(3, 1e-2)
    assert learn.recorder.value("valid_loss") < 0.7
    assert learn.scaler is None  # bf16 needs no GradScaler
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())


def test_metrics_match_hand_computed_values():
    pred = torch.tensor([[2.0, 1.0, 0.1], [0.1, 0.3, 2.0], [1.0, 3.0, 0.0], [0.2, 0.1, 0.0]])
    targ = torch.tensor([0, 2, 0, 1])
    assert accuracy(pred, targ) == pytest.approx(0.5)
    assert error_rate(pred, targ) == pytest.approx(0.5)
    # Accumulated over two batches equals the whole.
    m = accuracy()
    m.reset()
    m.accumulate(pred[:3], targ[:3])
    m.accumulate(pred[3:], targ[3:])
    assert m.value == pytest.approx(0.5)
    logits = torch.tensor([[2.0, -1.0, 0.5], [-2.0, 1.0, -0.5]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]])
    am = accuracy_multi()
    am.reset()
    am.accumulate(logits, labels)
    assert am.value == pytest.approx(4 / 6)  # decisions [1,0,1],[0,1,0] vs labels [1,0,0],[0,1,1]
    f = fbeta(beta=2.0)
    f.reset()
    f.accumulate(logits, labels)
    tp, fn, fp = 2, 1, 1
    assert f.value == pytest.approx(5 * tp / (5 * tp + 4 * fn + fp))
    seg_pred = torch.zeros(1, 2, 2, 2)
    seg_pred[0, 1, 0, :] = 1.0  # predicts foreground on the top row
    seg_targ = torch.tensor([[[1, 0], [1, 0]]])
    d = dice()
    d.reset()
    d.accumulate(seg_pred, seg_targ)
    assert d.value == pytest.approx(2 * 1 / (2 + 2))
    p, t = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0])
    assert mse(p, t) == pytest.approx(5 / 3)
    r = rmse()
    r.reset()
    r.accumulate(p[:1], t[:1])
    r.accumulate(p[1:], t[1:])
    assert r.value == pytest.approx(math.sqrt(5 / 3))
    e = exp_rmspe()
    e.reset()
    e.accumulate(p.log(), t.log())
    assert e.value == pytest.approx(math.sqrt(((0 / 1) ** 2 + (1 / 3) ** 2 + (2 / 2) ** 2) / 3))


def test_mismatched_output_and_target_shapes_are_rejected():
    learn = regression_learner()
    learn.model[-1] = nn.Linear(8, 2)  # two outputs per sample, one target
    with pytest.raises(ValueError, match="match the target"):
        learn.fit(1)


def test_unknown_metric_is_rejected():
    with pytest.raises(TypeError, match="unknown metric"):
        regression_learner(metrics=["accuracy"])


def test_nan_loss_stops_before_the_step():
    learn = regression_learner()
    learn.fit(1, lr=1e-3)
    x = learn.dls.train.tensors[0]
    x[40] = float("nan")  # a NaN input in the second batch when unshuffled
    learn.dls.train.shuffle = False
    before = [p.detach().clone() for p in learn.model.parameters()]

    class Snapshot(Callback):
        def before_batch(self):
            if self.learn.training and self.learn.iter == 1:
                self.params = [p.detach().clone() for p in self.learn.model.parameters()]

    snap = Snapshot()
    with pytest.raises(NonFiniteLossError, match="batch 1"):
        learn.fit(1, cbs=[snap])
    for a, b in zip(learn.model.parameters(), snap.params):
        assert torch.equal(a, b)  # the NaN batch never reached the optimizer
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert not any(torch.equal(a, b) for a, b in zip(learn.model.parameters(), before))


def test_early_stopping_save_model_timer_gradient_clip(tmp_path):
    learn = classification_learner(tmp_path, metrics=[accuracy])
    es = EarlyStopping(monitor="valid_loss", patience=1, min_delta=10.0)  # never "improves" by 10 after epoch 0
    sm = SaveModel(monitor="accuracy", fname="best")
    timer = Timer()

    class NormProbe(Callback):
        order = GradientClip.order + 1
        norms = []

        def before_step(self):
            ps = [p.grad for p in self.learn.model.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in ps]))))

    probe = NormProbe()
    learn.fit(10, lr=1e-2, cbs=[es, sm, timer, GradientClip(0.01), probe])
    assert es.stopped_epoch == 1 and len(learn.recorder.values) == 2
    assert (tmp_path / "models" / "best.pth").exists()
    assert not list((tmp_path / "models").glob(".*.tmp"))  # atomic: no temp files left behind
    assert len(timer.epoch_times) == 2 and all(s > 0 for s in timer.samples_per_s)
    assert max(probe.norms) <= 0.01 * (1 + 1e-4)


def test_monitoring_an_unrecorded_value_fails_before_training():
    learn = regression_learner()
    with pytest.raises(ValueError, match="accuracy"):
        learn.fit(1, cbs=[EarlyStopping(monitor="accuracy")])


def test_interrupt_leaves_a_consistent_state():
    learn = regression_learner()

    class Boom(Callback):
        def after_backward(self):
            if self.learn.iter == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, cbs=[Boom()])
    assert not learn.model.training
    assert all(p.grad is None for p in learn.model.parameters())
    learn.fit(4, lr=3e-2)  # and training can simply go on
    valid = [v[1] for v in learn.recorder.values]
    assert valid[-1] < valid[0] and all(math.isfinite(v) for v in valid)


def test_get_preds_interpretation_and_plots(tmp_path):
    learn = classification_learner(tmp_path)
    learn.fit(2, lr=1e-2)
    preds, targs, losses = learn.get_preds(with_loss=True)
    assert preds.shape == (120, 3) and torch.allclose(preds.sum(1), torch.ones(120))
    interp = ClassificationInterpretation.from_learner(learn, vocab=["a", "b", "c"])
    cm = interp.confusion_matrix()
    want = torch.zeros(3, 3, dtype=torch.long)
    for t, p in zip(targs.tolist(), preds.argmax(1).tolist()):
        want[t, p] += 1
    assert torch.equal(cm, want)
    top, idx = interp.top_losses(5)
    assert torch.allclose(top, losses.sort(descending=True).values[:5])
    assert interp.plot_confusion_matrix(tmp_path / "cm.png").exists()
    assert interp.plot_top_losses(4, tmp_path / "top.png").exists()
    learn.recorder.plot_loss(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").exists()


def test_hooks_and_grad_cam(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(1, 12, 12)
    with hook_output(model[2]) as h:
        model(x[None])
        assert h.stored.shape == (1, 8, 12, 12) and not h.stored.requires_grad
    with hook_outputs([model[0], model[2]]) as hs:
        model(x[None])
        assert [s.shape[1] for s in hs.stored] == [4, 8]
    cam = grad_cam(model, x, model[2], fname=tmp_path / "cam.png")
    assert cam.shape == (12, 12) and float(cam.min()) >= 0 and float(cam.max()) <= 1
    assert (tmp_path / "cam.png").exists()
    with pytest.raises(ValueError, match="one image"):
        grad_cam(model, x[None], model[2])


def test_tensor_loader_batches_by_slicing():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    dl = TensorLoader(x, y, batch_size=4)
    batches = list(dl)
    assert len(dl) == 3 and [len(b[1]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    shuffled = TensorLoader(x, y, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    got = torch.cat([b[1] for b in shuffled])
    assert sorted(got.tolist()) == list(range(10)) and not torch.equal(got, y)
    with pytest.raises(ValueError, match="rows"):
        TensorLoader(x, y[:5])


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["fused", "stock"])
def test_mixed_precision_fp16_with_grad_scaler_on_cuda(kernels):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 2, generator=g) * 3
    y = torch.randint(0, 3, (600,), generator=g)
    x = centers[y] + torch.randn(600, 2, generator=g)
    dls = DataLoaders.from_tensors((x[:480], y[:480]), (x[480:], y[480:]), batch_size=32, device="cuda", seed=0)
    model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    learn = Learner(dls, model, nn.CrossEntropyLoss(), kernels=kernels, metrics=[accuracy], progress=False,
                    cbs=[MixedPrecision(), GradientClip(1.0)])
    learn.fit_one_cycle(4, 1e-2)
    assert learn.recorder.value("accuracy") > 0.8
    assert learn.scaler is None and all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_fused_kernels_swap_in_fused_modules_and_train_like_stock():
    """kernels="fused" fuses the model (same parameters, same keys) and follows the stock run's trajectory."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    losses = {}
    for kernels in ("stock", "fused"):
        dls = DataLoaders.from_tensors((x[:64], y[:64]), (x[64:], y[64:]), batch_size=16, device="cpu", seed=0)
        model = make()
        keys = list(model.state_dict())
        learn = Learner(dls, model, nn.CrossEntropyLoss(), kernels=kernels, lr=1e-2, progress=False)
        learn.fit(2)
        losses[kernels] = learn.recorder.losses
        kinds = {type(m).__name__ for m in learn.model.modules()}
        assert ("FusedConv2d" in kinds and "BatchNormReLU1d" in kinds) == (kernels == "fused")
        assert list(learn.model.state_dict()) == keys
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["stock"]), rtol=1e-3, atol=1e-4)
