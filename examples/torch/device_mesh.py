"""A 2-D DeviceMesh over tprun's collectives: tensor parallelism inside "tp", FSDP2 across "dp".

    tprun -n 4 -- python examples/torch/device_mesh.py     # a (dp 2, tp 2) mesh
    torchrun --nproc-per-node 4 examples/torch/device_mesh.py

The MLP's first layer is split by columns and its second by rows across the two ranks of each tp
group (DTensor's ColwiseParallel / RowwiseParallel: one all_reduce per forward), and FSDP2 shards
the parameters across the two dp groups (all_gather before use, reduce_scatter of the gradients).
Checked at the end, so a wrong result exits non-zero: the parallel model's first output equals
the same model run whole on one rank, the loss falls, and the full weights are the same on every
rank. python/tests/test_examples.py runs it; docs/pytorch.md is the guide.
"""

import copy

import torch
import torch.distributed as dist
import tprun.torch  # noqa: F401  registers the "tprun" backend (its entry point does too)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 64)
        self.down = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def main():
    dist.init_process_group("tprun")  # was: "gloo"
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world % 2 == 0, f"run an even number of ranks (a tp group is 2), not {world}"
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = MLP()
    whole = copy.deepcopy(model)  # the unsplit model, for the check below
    model = parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])

    probe = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, want = model(probe), whole(probe)
    model.reshard()  # FSDP2: a forward with no backward after it leaves the weights gathered
    assert torch.allclose(got, want, atol=1e-5), f"rank {rank}: parallel output differs by {(got - want).abs().max()}"

    # Ranks of one tp group see the same batch; the dp groups see different ones.
    data = torch.Generator().manual_seed(1000 + mesh["dp"].get_local_rank())
    x = torch.randn(32, 16, generator=data)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), x.sin())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    full = torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()])
    rank0 = full.clone()
    dist.broadcast(rank0, src=0)
    assert torch.equal(full, rank0), f"rank {rank}: full weights differ from rank 0's"
    first, last = losses[0], losses[-1]
    assert last < first / 2, f"rank {rank}: the loss did not fall ({first:.4f} -> {last:.4f})"
    print(f"rank {rank}/{world} (dp {mesh['dp'].get_local_rank()}, tp {mesh['tp'].get_local_rank()}): "
          f"output matches the whole model, loss {first:.4f} -> {last:.4f}, same weights as rank 0")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
