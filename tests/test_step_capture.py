"""The training step belongs to the device: the CPU checks that stand for a GPU's.

A CUDA graph can capture a step only if nothing in it reads a tensor's value on the host
(`.item()`, `int(t)`, `bool(t)`, boolean indexing, an output whose size depends on values).
Here, on the CPU: every operator a step of each architecture runs is checked against the
operators that make a GPU wait; and the step, optimizer and bookkeeping included, compiles
into one graph with torch.compile(fullgraph=True), without recompiling from step to step,
with the eager step's results. tests/test_cuda.py captures it for real on a GPU.
"""

import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from sae import SaeConfig, TrainConfig, kernels
from sae.trainer import Trainer

ARCHITECTURES = ["topk", "batchtopk", "matryoshka", "jumprelu"]

#: Operators that make the host wait for the device: they read a value (item, bool), or size
#: their output by the data (nonzero, masked_select, unique, bincount, repeat_interleave of a
#: tensor of counts without output_size).
READS_ON_HOST = {
    "aten._local_scalar_dense",
    "aten.item",
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.masked_select",
    "aten.bincount",
    "aten.equal",
    "aten.allclose",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
}


class HostReads(TorchDispatchMode):
    """Records each operator that would make the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in READS_ON_HOST:
            self.found.append(str(func))
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            self.found.append(f"{func} without output_size")
        elif name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 and isinstance(args[1], list | tuple) else [])
            if i is not None
        ):
            self.found.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def _trainer(activation: str, **train_kw) -> Trainer:
    """A small trainer whose latents die within a step or two, with the GPU's host-free step
    (AuxK runs in full whether or not any latent is dead: its shapes are fixed)."""
    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(0)) * 3
    cfg = TrainConfig(
        batch_size=64, steps=40, val_fraction=0, dead_feature_threshold=64, lr=3e-3, **train_kw
    )
    trainer = Trainer(x, SaeConfig(num_latents=256, k=2, activation=activation), cfg)
    trainer.host_free = True
    return trainer


@pytest.mark.parametrize("activation", ARCHITECTURES)
def test_the_cpu_step_sized_by_the_dead_count_trains_as_the_host_free_one(activation):
    """On the CPU AuxK selects only as many latents as are dead (read on the host): the same
    losses and parameters as the GPU's fixed-width AuxK, while some latents are dead and
    while none is."""
    runs, dead = [], []
    # JumpReLU's latents die when they start above every pre-activation
    kw = {"jumprelu_init_threshold": 4.0} if activation == "jumprelu" else {}
    for host_free in (True, False):
        trainer = _trainer(activation, **kw)
        trainer.host_free = host_free
        for step in range(12):
            dead.append(trainer.dead_fraction())
            trainer.train_step(trainer._batch(step))
        runs.append(trainer)
    fixed, sized = runs
    assert dead[0] == 0 and max(dead) > 0  # steps with and without dead latents
    torch.testing.assert_close(sized.loss_sums, fixed.loss_sums)
    for name, p in fixed.sae.state_dict().items():
        torch.testing.assert_close(sized.sae.state_dict()[name], p, msg=name)


def test_the_detector_sees_what_makes_a_gpu_wait():
    x = torch.randn(8)
    cases = {
        "item": lambda: x.sum().item(),
        "int": lambda: int(x.argmax()),
        "bool": lambda: bool((x > 0).any()),
        "boolean index": lambda: x[x > 0],
        "nonzero": lambda: (x > 0).nonzero(),
        "bincount": lambda: torch.bincount(x.abs().long()),
        "repeat_interleave": lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3])),
    }
    for what, run in cases.items():
        with HostReads() as reads:
            run()
        assert reads.found, what
    with HostReads() as reads:
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]), output_size=6)
        x.topk(3), x.sort(), torch.where(x > 0, x, 0).sum()
    assert reads.found == []


@pytest.mark.parametrize("activation", ARCHITECTURES)
def test_a_training_step_never_waits_for_the_device(activation):
    trainer = _trainer(activation)
    for step in range(3):  # past the first step's initialisation
        trainer.train_step(trainer._batch(step))
    with HostReads() as reads:
        for step in range(3, 5):
            trainer.train_step(trainer._batch(step))
    assert reads.found == []


def test_the_sparse_products_never_wait_for_the_device():
    """The custom operators are opaque to a dispatch mode: their bodies, checked directly."""
    gen = torch.Generator().manual_seed(0)
    pre_BM = torch.randn(32, 64, generator=gen)
    sel = kernels.batch_top(pre_BM, 4 * 32)
    dense_BD = torch.randn(32, 16, generator=gen)
    W_MD = torch.randn(64, 16, generator=gen)
    with HostReads() as reads:
        kernels.batch_top(pre_BM, 4 * 32)
        kernels.per_row(*pre_BM.topk(4, dim=1))
        got = kernels._transposed_mm(sel.rows_N, sel.latents_N, sel.acts_N, dense_BD, 64)
        dots = kernels._sampled_dots(sel.offsets_B1, sel.latents_N, dense_BD, W_MD)
    assert reads.found == []
    S_BM = torch.zeros(32, 64).index_put_((sel.rows_N, sel.latents_N), sel.acts_N)
    torch.testing.assert_close(got, S_BM.T @ dense_BD)
    torch.testing.assert_close(dots, (dense_BD[sel.rows_N] * W_MD[sel.latents_N]).sum(1))


@pytest.mark.parametrize("activation", ARCHITECTURES)
def test_the_whole_step_compiles_to_one_graph_with_the_eager_results(activation):
    """torch.compile(fullgraph=True) of the step (forward, AuxK, backward, projection, Adam, lr
    schedule, renormalisation, thresholds, dead-latent counts): no graph break, no
    recompilation over steps, and the state after 6 compiled steps is the eager one's."""
    torch._dynamo.reset()
    eager, compiled = _trainer(activation), _trainer(activation)
    step = torch.compile(compiled._step, fullgraph=True, backend="aot_eager")
    # trace_autograd_ops: trace loss.backward() into the graph instead of breaking it there
    with torch._dynamo.config.patch(trace_autograd_ops=True, error_on_recompile=True):
        for trainer, run in ((eager, eager._step), (compiled, step)):
            trainer.train_step(trainer._batch(0))  # the first step initialises b_dec eagerly
            for s in range(1, 7):
                trainer.optimizer.zero_grad(set_to_none=True)
                run(trainer._batch(s))
                trainer.step += 1
    state, expected = compiled.sae.state_dict(), eager.sae.state_dict()
    for name in expected:
        torch.testing.assert_close(state[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(compiled.since_fired_M, eager.since_fired_M)
    torch.testing.assert_close(compiled.loss_sums, eager.loss_sums, atol=1e-6, rtol=1e-5)
    assert compiled.step_T.item() == eager.step_T.item() == 7
