"""FusedAdam / FusedAdamW and the fck::adam_ op: every backend against torch.optim and the reference."""

import collections
import copy
import itertools

import pytest
import torch

import fastcore_kernels as fck
from fastcore_kernels.ops import adam_
from fastcore_kernels.reference.adam import adam_ as reference_adam_

from conftest import ALL_BACKENDS, devices, skip_unless_runnable

# Sizes straddle the kernels' chunk sizes (Triton 4096, CUDA 4096, CPU 16384) and include a 0-d and an empty param.
SHAPES = [(37,), (33, 65), (5, 7, 3), (), (0, 4), (4097,), (16385,)]

OPTIONS = [
    dict(),
    dict(weight_decay=0.1),
    dict(amsgrad=True),
    dict(maximize=True, lr=0.01),
    dict(weight_decay=0.05, amsgrad=True, maximize=True, betas=(0.8, 0.99), eps=1e-6),
    dict(betas=(0.3, 0.9)),  # 1 - beta1 >= 0.5: the other branch of lerp
    dict(lr="tensor"),
]


def _params(shapes, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]


def _groups(params, opts):
    """Two param groups with different lrs, so per-group hyper-parameters are exercised."""
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], "lr": opts.get("lr", 1e-3) * 0.5}]


def _train(opt_factory, params, steps=100, seed=1, grad_dtype=None):
    opt = opt_factory(params)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device, grad_dtype or p.dtype)
        opt.step()
    return opt


def _resolve_opts(opts, device):
    opts = dict(opts)
    if opts.get("lr") == "tensor":
        opts["lr"] = torch.tensor(3e-3)
    return opts


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_matches_torch_after_100_steps(device, backend, opts, decoupled):
    skip_unless_runnable(backend, device)
    opts = _resolve_opts(opts, device)
    torch_cls, ours = (torch.optim.AdamW, fck.FusedAdamW) if decoupled else (torch.optim.Adam, fck.FusedAdam)
    lr = float(opts.get("lr", 1e-3))
    expected = _params(SHAPES, device)
    got = _params(SHAPES, device)
    _train(lambda ps: torch_cls(_groups(ps, {"lr": lr}), foreach=False, **opts), expected)
    _train(lambda ps: ours(_groups(ps, {"lr": lr}), backend=backend, **opts), got)
    # CPU backends reproduce torch's op sequence; the GPU kernels contract multiply-adds as torch's CUDA kernels do.
    tol = dict(rtol=1e-6, atol=1e-7) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"param {i} {tuple(a.shape)}: {m}")


def _random_state(shapes, device, dtype, master, amsgrad, seed):
    """Fresh random (never zero) state, so a kernel that skips an element cannot pass."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, dt, positive=False):
        t = torch.randn(shape, generator=g)
        return (t.abs() + 0.01 if positive else t).to(device, dt)

    sdt = torch.float32 if master else dtype
    params = [rnd(s, dtype) for s in shapes]
    return dict(
        params=params,
        grads=[rnd(s, dtype) for s in shapes],
        exp_avgs=[rnd(s, sdt) for s in shapes],
        exp_avg_sqs=[rnd(s, sdt, positive=True) for s in shapes],
        max_exp_avg_sqs=[rnd(s, sdt, positive=True) for s in shapes] if amsgrad else [],
        master_params=[p.float() + 1e-3 * rnd(p.shape, torch.float32) for p in params] if master else [],
        state_steps=[torch.tensor(float(k % 3 + 1)) for k in range(len(shapes))],  # unequal step counts
    )


DTYPE_CASES = [
    (torch.float32, False),
    (torch.float16, False),
    (torch.bfloat16, False),
    (torch.float16, True),
    (torch.bfloat16, True),
]
# One step from identical inputs: fp32 differs by rounding only; half outputs by at most one rounding of the result.
OP_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
          torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.mark.parametrize("amsgrad,maximize,decoupled", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("dtype,master", DTYPE_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_op_matches_reference_on_random_state(device, backend, dtype, master, amsgrad, maximize, decoupled):
    skip_unless_runnable(backend, device)
    shapes = [(37,), (4096 + 3,), (2, 3, 5), (0,), (1,)]
    state = _random_state(shapes, device, dtype, master, amsgrad, seed=7)
    expected = copy.deepcopy(state)
    hyper = dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, amsgrad=amsgrad, maximize=maximize,
                 decoupled_weight_decay=decoupled, inv_grad_scale=0.5)
    ran = adam_(**state, **hyper, backend=backend)
    assert ran == backend
    reference_adam_(*expected.values(), *hyper.values())
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params", "state_steps"):
        for i, (a, b) in enumerate(zip(state[key], expected[key])):
            tol = OP_TOL[torch.float32 if a.dtype in (torch.float32, torch.float64) else a.dtype]
            torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{key}[{i}]: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_master_weights_follow_the_fp32_trajectory(device, backend, dtype):
    """With master weights, a half param is its fp32 master rounded, and the master follows the fp32 trajectory."""
    skip_unless_runnable(backend, device)
    shapes = [(257,), (31, 9)]
    fp32 = _params(shapes, device)
    half = [torch.nn.Parameter(p.detach().to(dtype)) for p in fp32]
    for p32, ph in zip(fp32, half):  # start from the same (representable) values
        p32.data.copy_(ph.data.float())
    opt32 = torch.optim.Adam(fp32, lr=1e-4, foreach=False)
    opth = fck.FusedAdam(half, lr=1e-4, master_weights=True, backend=backend)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        for p32, ph in zip(fp32, half):
            grad = torch.randn(p32.shape, generator=g).to(device, dtype)
            ph.grad, p32.grad = grad, grad.float()
        opt32.step()
        opth.step()
    for p32, ph in zip(fp32, half):
        master = opth.state[ph]["master_param"]
        torch.testing.assert_close(master, p32.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ph.detach(), master.to(dtype), rtol=0, atol=0)  # the param is the rounded master
        assert opth.state[ph]["exp_avg"].dtype == torch.float32


def test_state_dict_moves_both_ways():
    shapes = [(13,), (8, 3)]
    straight = _params(shapes, "cpu")
    _train(lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=False), straight, steps=20)

    # 10 steps with torch, continue 10 with ours from torch's state_dict.
    a = _params(shapes, "cpu")
    opt_t = _train(lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=False), a, steps=10)
    ours = fck.FusedAdam(a, lr=1e-2, amsgrad=True)
    ours.load_state_dict(opt_t.state_dict())
    g = torch.Generator().manual_seed(1)
    for _ in range(10):  # regenerate the first 10 steps' grads so the stream lines up with `straight`
        [torch.randn(p.shape, generator=g) for p in a]
    for _ in range(10):
        for p in a:
            p.grad = torch.randn(p.shape, generator=g)
        ours.step()
    for x, y in zip(a, straight):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)

    # And back: torch loads ours and its keys and layout are what torch produces.
    sd = ours.state_dict()
    back = torch.optim.Adam(a, lr=1e-2, amsgrad=True, foreach=False)
    back.load_state_dict(sd)
    ref_sd = torch.optim.Adam(_params(shapes, "cpu"), amsgrad=True).state_dict()
    assert set(sd["param_groups"][0]) >= set(ref_sd["param_groups"][0])
    for st in sd["state"].values():
        assert set(st) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu"


def test_master_state_survives_save_and_load(tmp_path):
    params = _params([(64,)], "cpu", torch.bfloat16)
    opt = _train(lambda ps: fck.FusedAdam(ps, master_weights=True), params, steps=3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = fck.FusedAdam(params, master_weights=True)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    st, st0 = fresh.state[params[0]], opt.state[params[0]]
    for key in ("master_param", "exp_avg", "exp_avg_sq"):
        assert st[key].dtype == torch.float32
        torch.testing.assert_close(st[key], st0[key], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("device", devices())
def test_grad_scaler_skips_inf_steps_and_unscales(device, backend):
    skip_unless_runnable(backend, device)
    torch.manual_seed(0)
    model_t = torch.nn.Linear(6, 3).to(device)
    model_f = copy.deepcopy(model_t)
    opt_t = torch.optim.Adam(model_t.parameters(), lr=1e-2, foreach=False)
    opt_f = fck.FusedAdam(model_f.parameters(), lr=1e-2, backend=backend)
    sc_t, sc_f = torch.amp.GradScaler(device, init_scale=1024.0), torch.amp.GradScaler(device, init_scale=1024.0)
    x, y = torch.randn(16, 6, device=device), torch.randn(16, 3, device=device)
    for it in range(6):
        for model, opt, sc in ((model_t, opt_t, sc_t), (model_f, opt_f, sc_f)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            sc.scale(loss).backward()
            if it == 2:
                model.weight.grad[0, 0] = float("inf")
            sc.step(opt)
            sc.update()
    tol = dict(rtol=1e-6, atol=1e-7) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(model_f.parameters(), model_t.parameters()):
        torch.testing.assert_close(a, b, **tol)
    assert float(opt_f.state[model_f.weight]["step"]) == 5.0  # the inf step did not count
    assert sc_f.get_scale() == sc_t.get_scale()


def test_channels_last_and_strided_grads():
    w = torch.nn.Parameter(torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last))
    ref = torch.nn.Parameter(w.detach().clone())
    opt, opt_ref = fck.FusedAdam([w]), torch.optim.Adam([ref], foreach=False)
    for _ in range(3):
        g = torch.randn(4, 3, 5, 5)  # contiguous grad for a channels_last param: strides differ
        w.grad, ref.grad = g, g.clone()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)
    assert opt.state[w]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_grad_strides_differ_only_on_size_one_dims(backend):
    """A (8, 1, 3, 3) conv weight's gradient can come back contiguous with another stride on the size-1 dimension
    (oneDNN's convolution backward does): the same flat order, so the fused step takes it as it is."""
    skip_unless_runnable(backend, "cpu")
    w = torch.nn.Parameter(torch.randn(8, 1, 3, 3))
    ref = torch.nn.Parameter(w.detach().clone())
    opt, opt_ref = fck.FusedAdam([w], backend=backend), torch.optim.Adam([ref], foreach=False)
    for _ in range(3):
        g = torch.randn(8, 1, 3, 3).as_strided((8, 1, 3, 3), (9, 1, 3, 1))
        assert g.is_contiguous() and g.stride() != w.stride()
        w.grad, ref.grad = g, g.clone()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)


def test_non_dense_param_falls_back_to_reference():
    base = torch.randn(6, 8)
    p = torch.nn.Parameter(base[:, ::2])  # strided, not dense
    ref = torch.nn.Parameter(p.detach().clone())
    opt, opt_ref = fck.FusedAdam([p]), torch.optim.Adam([ref], foreach=False)
    for _ in range(3):
        g = torch.randn(6, 4)
        p.grad, ref.grad = g, g.clone()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-7)


def test_float64_params_run_in_float64():
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    ref = torch.nn.Parameter(p.detach().clone())
    opt, opt_ref = fck.FusedAdam([p]), torch.optim.Adam([ref], foreach=False)
    for _ in range(5):
        g = torch.randn(10, dtype=torch.float64)
        p.grad, ref.grad = g, g.clone()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(p, ref, rtol=1e-12, atol=1e-14)


def test_zero_grad_and_closure():
    p = torch.nn.Parameter(torch.randn(3))
    opt = fck.FusedAdam([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and p.grad is not None
    opt.zero_grad()
    assert p.grad is None


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], {}), "complex"),
        (lambda: ([torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3, device="meta"))], {}),
         "one device"),
    ],
    ids=["complex", "mixed-devices"],
)
def test_bad_params_raise_clear_errors(make, match):
    params, kw = make()
    for p in params:
        p.grad = torch.ones_like(p)
    opt = fck.FusedAdam(params, **kw)
    with pytest.raises((TypeError, ValueError), match=match):
        opt.step()


def test_sparse_grad_raises():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        fck.FusedAdam(emb.parameters()).step()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(1.0, 0.9)), "beta"),
        (dict(eps=-1e-8), "epsilon"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(capturable=True), "capturable"),
        (dict(differentiable=True), "differentiable"),
        (dict(backend="gpu"), "unknown fastcore_kernels backend"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fck.FusedAdam([torch.nn.Parameter(torch.randn(2))], **kwargs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_op_rejects_mismatched_inputs(backend):
    """Every backend refuses inputs that do not line up, naming the offending tensor (ValueError from the Python
    checks, RuntimeError from the C++ ones), and writes nothing."""
    skip_unless_runnable(backend, "cpu")
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, backend=backend)
    p = [torch.randn(4)]
    before = p[0].clone()
    with pytest.raises(ValueError, match="grads has 0 tensors"):
        adam_(p, [], [torch.zeros(4)], [torch.zeros(4)], [], [], [torch.tensor(0.0)], **hyper)
    bad = [
        ([torch.randn(5)], [torch.zeros(4)], "grads\\[0\\]"),                     # wrong shape
        ([torch.randn(4, dtype=torch.float16)], [torch.zeros(4)], "grads\\[0\\]"),  # wrong dtype
        ([torch.randn(4)], [torch.zeros(4, dtype=torch.float16)], "exp_avgs\\[0\\]|state"),
        ([torch.randn(8)[::2]], [torch.zeros(4)], "grads\\[0\\]|strides"),        # non-dense grad
    ]
    with pytest.raises((ValueError, RuntimeError), match="state_steps"):
        adam_(p, [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)], [], [], [torch.tensor(0.0, dtype=torch.float64)],
              **hyper)
    for grads, exp_avgs, match in bad:
        if backend == "reference" and "strides" in match:
            continue  # the reference computes on any layout
        with pytest.raises((ValueError, RuntimeError), match=match):
            adam_(p, grads, exp_avgs, [torch.zeros(4)], [], [], [torch.tensor(0.0)], **hyper)
    assert torch.equal(p[0], before)


def test_cxx_op_guards_direct_calls():
    """torch.ops.fck.adam_ called directly (no Python checks) refuses bad input instead of touching memory."""
    skip_unless_runnable("cpu", "cpu")
    p = [torch.randn(4)]
    with pytest.raises(RuntimeError, match="same shape|has shape"):
        torch.ops.fck.adam_(p, [torch.randn(5)], [torch.zeros(4)], [torch.zeros(4)], [], [], [torch.tensor(0.0)],
                            1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 1.0)
    with pytest.raises(RuntimeError, match="same length"):
        torch.ops.fck.adam_(p, [], [torch.zeros(4)], [torch.zeros(4)], [], [], [torch.tensor(0.0)],
                            1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False, 1.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_params_that_skip_steps_and_groups_added_later(backend):
    """Params without a grad on some steps keep their state and step count; a group added mid-training starts
    fresh, and so does every param when the state dict is replaced. Exercises the optimizer's cached per-group plan
    as it is invalidated and rebuilt."""
    skip_unless_runnable(backend, "cpu")
    ours, ref = _params([(9,), (4, 5), (3,)], "cpu"), _params([(9,), (4, 5), (3,)], "cpu")
    late_ours, late_ref = _params([(6,)], "cpu", seed=5), _params([(6,)], "cpu", seed=5)
    opt = fck.FusedAdam(ours[:2], lr=1e-2, backend=backend)
    opt_ref = torch.optim.Adam(ref[:2], lr=1e-2, foreach=False)
    g = torch.Generator().manual_seed(2)
    for it in range(12):
        if it == 4:
            opt.add_param_group({"params": ours[2:] + late_ours, "lr": 5e-3})
            opt_ref.add_param_group({"params": ref[2:] + late_ref, "lr": 5e-3})
        for k, (a, b) in enumerate(zip(ours + late_ours, ref + late_ref)):
            skip = (it % 3 == 1 and k == 1) or (it == 7 and k == 3)
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = (None, None) if skip else (grad, grad.clone())
        if it == 9:  # a fresh state dict: every param starts over
            opt.state = collections.defaultdict(dict)
            opt_ref.state = collections.defaultdict(dict)
        opt.step()
        opt_ref.step()
    for a, b in zip(ours + late_ours, ref + late_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert float(opt.state[a]["step"]) == float(opt_ref.state[b]["step"]) <= 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_half_storage_round_trips_every_bit_pattern(backend, dtype):
    """lr=0 leaves params unchanged, so every one of the 65536 16-bit patterns must survive the kernels' own
    fp16/bf16 <-> fp32 conversions bit for bit (NaNs stay NaN)."""
    skip_unless_runnable(backend, "cpu")
    p = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).clone()
    before = p.clone()
    g = torch.randn(p.shape).to(dtype)
    m, v = torch.randn(p.shape).to(dtype), (torch.rand(p.shape) + 0.1).to(dtype)
    adam_([p], [g], [m], [v], [], [], [torch.tensor(0.0)], lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
          weight_decay=0.0, backend=backend)
    nan, zero = torch.isnan(before), before == 0
    assert torch.equal(torch.isnan(p), nan)
    assert bool((p[zero] == 0).all())  # -0 + (-0 * m) / d is +0 or -0 depending on m's sign, in torch too
    keep = ~nan & ~zero
    if backend == "triton" and dtype == torch.bfloat16:
        # bf16 subnormals (|x| < 1.2e-38, fp32's subnormal range) are not preserved by Triton's arithmetic; they
        # stay subnormal or become zero, never anything else.
        tiny = before.float().abs() < torch.finfo(torch.float32).tiny
        assert bool((p[tiny & keep].float().abs() < torch.finfo(torch.float32).tiny).all())
        keep &= ~tiny
    assert torch.equal(p.view(torch.int16)[keep], before.view(torch.int16)[keep])
    # And a real step rounds to nearest even exactly as torch's own conversion does.
    state = _random_state([(4099,)], "cpu", dtype, False, False, seed=3)
    expected = copy.deepcopy(state)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False, inv_grad_scale=1.0)
    adam_(**state, **hyper, backend=backend)
    reference_adam_(*expected.values(), *hyper.values())
    for key in ("exp_avgs", "exp_avg_sqs"):  # no sqrt on their path: bit-identical
        assert torch.equal(state[key][0], expected[key][0]), key
