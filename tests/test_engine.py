"""The training engine (core/engine.py): precision, accumulation, clipping, sharing among processes, checkpoints."""
import pytest
import torch

from core.engine import Engine, EngineSpec


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=g), torch.randn(6, 3, generator=g)


def _train(engine, steps=3, units=2, model=None):
    model = model or _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = _data()
    for _ in range(steps):
        for u in engine.mine(units):
            part = slice(u * 6 // units, (u + 1) * 6 // units)
            with engine.autocast():
                loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
            engine.backward(loss, units)
        engine.step(opt)
    return model


def test_spec_reads_a_config_node_and_refuses_bad_values():
    assert EngineSpec.from_config({"mixed_precision": "bf16", "grad_clip": 1.0, "lr": 3}) == EngineSpec("bf16", 1.0)
    assert EngineSpec.from_config(None) == EngineSpec()
    with pytest.raises(ValueError, match="mixed_precision must be one of"):
        EngineSpec.from_config({"mixed_precision": "fp8"})
    with pytest.raises(ValueError, match="grad_clip"):
        EngineSpec.from_config({"grad_clip": 0})
    with pytest.raises(ValueError, match="fp16 needs a GPU.*bf16"):
        Engine(EngineSpec("fp16"), "cpu")


def test_accumulated_micro_batches_give_the_full_batch_gradient():
    """units micro-batches, each backward of loss / units: the gradient of the mean loss over the whole batch."""
    x, y = _data()
    a, b = _model(), _model()
    torch.nn.functional.mse_loss(a(x), y).backward()
    engine = Engine()
    for part in (slice(0, 3), slice(3, 6)):
        engine.backward(torch.nn.functional.mse_loss(b(x[part]), y[part]), 2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad)


def test_bf16_autocasts_the_forward_and_keeps_float32_weights():
    lin = torch.nn.Linear(4, 3)
    bf16, fp32 = Engine(EngineSpec("bf16")), Engine(EngineSpec("no"))
    with bf16.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with fp32.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32
    a, b = _train(Engine(EngineSpec("bf16"))), _train(Engine(EngineSpec("no")))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert pa.dtype == torch.float32
        torch.testing.assert_close(pa, pb, atol=2e-2, rtol=0)   # bf16 keeps 8 bits: close, not equal
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))  # it did autocast


def test_clipping_scales_the_global_norm_down_to_the_limit():
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p, q], lr=1.0)
    p.grad, q.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])   # global norm 5
    norm = Engine(EngineSpec(grad_clip=1.0)).step(opt)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.6, 0.0]))   # (3, 0, 4) / 5, one SGD step of lr 1
    torch.testing.assert_close(q.detach(), torch.tensor([-0.8]))
    assert p.grad is None   # zeroed for the next step


def test_units_are_shared_in_equal_blocks_or_refused():
    e = Engine()
    assert e.mine(4) == range(0, 4)
    e.distributed = True
    e.accelerator = type("A", (), {"process_index": 1, "num_processes": 2})()
    assert e.mine(4) == range(2, 4) and e.rank == 1 and not e.is_main
    with pytest.raises(ValueError, match="3 mixed batches.*multiple of 2"):
        e.mine(3, "mixed batches")


def test_checkpoint_round_trip_loads_with_weights_only_and_resumes_bitwise(tmp_path):
    engine = Engine()
    x, y = _data()

    def fresh(seed=0):
        model = _model(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)

    def step(model, opt, sched):
        engine.backward(torch.nn.functional.mse_loss(model(x), y), 1)
        engine.step(opt, sched)
    ref = fresh()
    for _ in range(4):
        step(*ref)
    # two steps, a checkpoint, a "new process" (other weights, fresh optimiser, scrambled RNG), two more steps
    run = fresh()
    step(*run), step(*run)
    table = torch.arange(6.0).reshape(2, 3)
    torch.manual_seed(7)
    rng_then = torch.rand(3)
    torch.manual_seed(7)
    engine.save(tmp_path / "state.pt", 2, {"model": run[0], "table": table}, {"opt": run[1], "sched": run[2]},
                {"losses": [0.5, 0.25]})
    state = torch.load(tmp_path / "state.pt", weights_only=True)   # plain data only: no pickled code runs
    assert state["step"] == 2 and state["extra"] == {"losses": [0.5, 0.25]}
    run, table2 = fresh(seed=3), torch.zeros(2, 3)
    torch.manual_seed(99)
    done, extra = engine.load(tmp_path / "state.pt", {"model": run[0], "table": table2},
                              {"opt": run[1], "sched": run[2]})
    assert done == 2 and extra["losses"] == [0.5, 0.25] and torch.equal(table2, table)
    assert torch.equal(torch.rand(3), rng_then)   # the RNG state came back
    assert run[2].last_epoch == 2
    step(*run), step(*run)
    for pa, pb in zip(run[0].parameters(), ref[0].parameters()):
        assert torch.equal(pa, pb)
    model = run[0]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"Cannot resume training from .*bad.pt.*delete it"):
        engine.load(tmp_path / "bad.pt", {"model": model})
    with pytest.raises(RuntimeError, match="Cannot resume"):   # another configuration: the shapes differ
        engine.load(tmp_path / "state.pt", {"model": torch.nn.Linear(5, 3)})


def test_gradient_checkpointing_changes_memory_not_gradients():
    from core.models import build_random
    grads = []
    for on in (False, True):
        comp = build_random("tiny", seed=0)
        Engine(EngineSpec(gradient_checkpointing=on)).prepare_unet(comp.unet)
        assert comp.unet.is_gradient_checkpointing == on
        comp.unet.train()
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        ctx = torch.randn(2, 7, comp.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        comp.unet(z, torch.tensor([10, 500]), ctx).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in comp.unet.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_skips_exactly_the_blocks_that_hold_a_captured_layer():
    from core.models import build_random
    unet = build_random("tiny", seed=0).unet
    captured = [n for n, _ in unet.named_modules() if n.endswith("attn2")][:1]
    assert captured
    Engine(EngineSpec(gradient_checkpointing=True), "cpu").prepare_unet(unet, captured)
    flagged = {n: m.gradient_checkpointing for n, m in unet.named_modules() if hasattr(m, "gradient_checkpointing")}
    holding = {n for n in flagged if captured[0].startswith(n + ".") or n == captured[0]}
    assert holding and all(flagged[n] is False for n in holding)
    others = [n for n in flagged if n not in holding and n]
    assert others and all(flagged[n] is True for n in others)         # every other block still checkpoints
    plain = build_random("tiny", seed=0).unet
    Engine(EngineSpec(), "cpu").prepare_unet(plain, captured)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())


def test_autocast_runs_bf16_on_cpu_and_nothing_without_mixed_precision():
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with Engine(EngineSpec("bf16"), "cpu").autocast():
        assert (a @ b).dtype == torch.bfloat16
    with Engine(EngineSpec("no"), "cpu").autocast():
        assert (a @ b).dtype == torch.float32


def test_load_refuses_other_keys_and_non_tensor_pickles_naming_the_file(tmp_path):
    eng = Engine(EngineSpec(), "cpu")
    table = {"a": torch.zeros(2), "b": torch.zeros(3)}
    eng.save(tmp_path / "s.pt", 4, {"table": table})
    got = {"a": torch.ones(2), "b": torch.ones(3)}
    assert eng.load(tmp_path / "s.pt", {"table": got})[0] == 4 and all((v == 0).all() for v in got.values())
    with pytest.raises(RuntimeError, match=r"Cannot resume training from .*s\.pt: .*differ from the expected"):
        eng.load(tmp_path / "s.pt", {"table": {"a": torch.ones(2), "c": torch.ones(3)}})
    torch.save({"step": 1, "thing": EngineSpec()}, tmp_path / "obj.pt")
    with pytest.raises(RuntimeError, match=r"obj\.pt: it holds more than tensors and plain containers"):
        eng.load(tmp_path / "obj.pt")
