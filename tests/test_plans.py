"""Launch plans (kernels/plans.py): when the dispatcher plans a call, what a signature covers, and that a planned
call runs the plan while the first call of a signature runs the normal path. The GPU test
(tests/test_kernels_gpu.py) checks planned outputs against the normal path on the H100."""

import torch
from comfyui_headroom.kernels import configs, dispatch, launch, plans
from comfyui_headroom.kernels.int8 import quantize_weight

BF16 = torch.bfloat16


def _layer(n=32, k=64, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    qw, sw = quantize_weight(torch.randn(n, k, generator=gen) * 0.05, "rowwise")
    return qw, sw, torch.randn(n, generator=gen).to(BF16)


def test_signature_covers_layout_not_data():
    qw, sw, b = _layer()
    x = torch.randn(2, 5, 64).to(BF16)
    same = plans.signature(x.clone(), qw.clone(), sw.clone(), b.clone(), 128)
    assert plans.signature(x, qw, sw, b, 128) == same  # other data, same layout: one plan
    variants = [
        (x[:, :4], qw, sw, b, 128),                     # another M
        (x.float(), qw, sw, b, 128),                    # another dtype
        (x.transpose(0, 1), qw, sw, b, 128),            # not contiguous
        (x, qw, sw, None, 128),                         # no bias
        (x, qw, sw, b, 64),                             # block size
        (torch.empty(2 * 5 * 64 + 1, dtype=BF16)[1:].view(2, 5, 64), qw, sw, b, 128),  # 2-byte aligned, not 16
    ]
    for args in variants:
        assert plans.signature(*args) != same, args


def test_plans_only_replace_the_automatic_unlogged_choice(monkeypatch):
    monkeypatch.setattr(plans, "usable", lambda: True)
    assert dispatch._plans_allowed()
    with dispatch.force_kernel("triton_w8a8"):
        assert not dispatch._plans_allowed()
    monkeypatch.setattr(dispatch._state, "env", dispatch._state.env.__class__(forced=None, log=True, debug=False))
    assert not dispatch._plans_allowed()


def test_usable_follows_fast_launch_gluon_and_overrides():
    launch.set_fast_launch(True)
    configs.set_gluon(True)
    base = plans.usable()
    try:
        launch.set_fast_launch(False)
        assert not plans.usable()
        launch.set_fast_launch(True)
        configs.set_gluon(False)
        assert not plans.usable()
        configs.set_gluon(True)
        with configs.override(ws=configs.W8A8_WS_CONFIGS["sm90"][0]):
            assert not plans.usable()
        assert plans.usable() == base
    finally:
        launch.set_fast_launch(True)
        configs.set_gluon(True)


class _FakePlan:
    """Stands in for a LinearPlan on the CPU: computes the reference and counts its runs."""

    def __init__(self, m, n, k):
        self.m, self.n, self.k, self.runs = m, n, k, 0

    def run(self, x, weight, weight_scale, bias):
        self.runs += 1
        from comfyui_headroom.kernels.reference import reference_linear

        return reference_linear(x, weight, weight_scale, bias, 128)


def test_first_call_runs_the_normal_path_then_the_plan(monkeypatch):
    from comfyui_headroom.kernels import kernel_summary, reset_kernel_stats

    made = []

    def fake_build(x, weight, weight_scale, bias):
        made.append(x.shape)
        return _FakePlan(x.numel() // x.shape[-1], weight.shape[0], x.shape[-1])

    real_normal_path = dispatch.dispatch_and_run
    monkeypatch.setattr(plans, "build", fake_build)
    monkeypatch.setattr(dispatch, "auto_kernel", lambda x, w, s: "triton_w8a8")  # what a Hopper would choose
    monkeypatch.setattr(dispatch, "dispatch_and_run", lambda *a: _on_reference(real_normal_path, *a))
    monkeypatch.setattr(dispatch, "_plans_module", plans)
    dispatch._plans.clear()
    reset_kernel_stats()
    qw, sw, b = _layer()
    x = torch.randn(3, 64).to(BF16)
    first = dispatch._planned(x, qw, sw, b, 128)        # normal path (reference on the CPU), plan built
    assert made == [x.shape] and kernel_summary()["reference"]["calls"] == 1
    plan = dispatch._plans[plans.signature(x, qw, sw, b, 128)]
    second = dispatch._planned(x, qw, sw, b, 128)       # the plan
    assert plan.runs == 1 and torch.equal(first, second)
    assert kernel_summary()["triton_w8a8"]["shapes"] == {"3x32x64": 1}  # a planned call counts as its kernel
    dispatch._planned(torch.randn(4, 64).to(BF16), qw, sw, b, 128)      # new signature: normal path + build
    assert len(made) == 2 and plan.runs == 1
    dispatch._plans.clear()


def test_int8_input_calls_are_planned_by_their_own_signature(monkeypatch):
    """Int8Linear.forward_int8's entry: first call normal path + build_int8_input, then the plan's run_int8."""
    from comfyui_headroom.kernels.backends import reference_int8
    from comfyui_headroom.kernels.int8 import quantize_activation

    class Int8InputPlan(_FakePlan):
        def run_int8(self, qa, a_scale, weight, weight_scale, bias, out_dtype):
            self.runs += 1
            return reference_int8(qa, a_scale, weight, weight_scale, bias, out_dtype, 128)

    made = []

    def fake_build(qa, a_scale, weight, weight_scale, bias, out_dtype):
        made.append(qa.shape)
        return Int8InputPlan(qa.shape[0], weight.shape[0], qa.shape[1])

    monkeypatch.setattr(plans, "build_int8_input", fake_build)
    monkeypatch.setattr(dispatch, "auto_kernel", lambda x, w, s: "triton_w8a8")  # what a Hopper would choose
    monkeypatch.setattr(dispatch, "_int8_input_normal",  # ... computed by the reference on the CPU
                        lambda *args: dispatch.run_kernel_int8_input("reference", *args))
    monkeypatch.setattr(dispatch, "_plans_module", plans)
    dispatch._plans.clear()
    qw, sw, b = _layer()
    qa, sa = quantize_activation(torch.randn(3, 64).to(BF16))
    first = dispatch._planned_int8_input(qa, sa, qw, sw, b, BF16, 128)   # normal path (reference here), plan built
    second = dispatch._planned_int8_input(qa, sa, qw, sw, b, BF16, 128)  # the plan
    plan = dispatch._plans[plans.signature_int8_input(qa, sa, qw, sw, b, BF16, 128)]
    assert made == [qa.shape] and plan.runs == 1 and torch.equal(first, second)
    assert plans.signature_int8_input(qa, sa, qw, sw, b, torch.float16, 128) not in dispatch._plans  # out dtype counts
    dispatch._plans.clear()


def test_calls_that_are_not_planned_stay_on_the_normal_path(monkeypatch):
    monkeypatch.setattr(plans, "build", lambda *a: None)
    monkeypatch.setattr(dispatch, "_plans_module", plans)
    dispatch._plans.clear()
    qw, sw, b = _layer()
    x = torch.randn(3, 64).to(BF16)
    for _ in range(3):
        y = dispatch._planned(x, qw, sw, b, 128)
    assert dispatch._plans[plans.signature(x, qw, sw, b, 128)] is dispatch._NO_PLAN
    from comfyui_headroom.kernels.reference import reference_linear

    assert torch.equal(y, reference_linear(x, qw, sw, b, 128))
    dispatch._plans.clear()


def test_a_plan_whose_launch_is_rejected_falls_back_and_plans_stop(monkeypatch):
    """A Triton whose launcher rejects direct launches: the planned call still computes (normal path), and
    direct launches - hence plans - are off from then on."""
    from comfyui_headroom.kernels.reference import reference_linear

    class Rejected(_FakePlan):
        def run(self, *args):
            raise TypeError("this launcher takes other arguments")

    monkeypatch.setattr(plans, "build", lambda x, w, s, b: Rejected(x.shape[0], w.shape[0], x.shape[-1]))
    monkeypatch.setattr(dispatch, "auto_kernel", lambda x, w, s: "triton_w8a8")
    monkeypatch.setattr(dispatch, "_plans_module", plans)
    real_normal_path = dispatch.dispatch_and_run
    monkeypatch.setattr(dispatch, "dispatch_and_run", lambda *a: _on_reference(real_normal_path, *a))
    dispatch._plans.clear()
    qw, sw, b = _layer()
    x = torch.randn(3, 64).to(BF16)
    try:
        dispatch._planned(x, qw, sw, b, 128)                     # normal path, plan built
        y = dispatch._planned(x, qw, sw, b, 128)                 # the plan's launch is rejected
        assert torch.equal(y, reference_linear(x, qw, sw, b, 128))
        assert not launch.fast_launch_enabled() and not plans.usable() and not dispatch._plans
    finally:
        launch.set_fast_launch(True)
        dispatch._plans.clear()


def _on_reference(normal_path, *args):
    """The dispatcher's normal path on the reference kernel (no GPU here)."""
    with dispatch.force_kernel("reference"):
        return normal_path(*args)
