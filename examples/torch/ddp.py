"""Data-parallel training with DistributedDataParallel over tprun's collectives (CPU tensors).

    tprun -n 4 -- python examples/torch/ddp.py
    torchrun --nproc-per-node 4 examples/torch/ddp.py      # the same script, unchanged

The one tprun-specific word is the backend name in init_process_group (it was "gloo"). Each rank
trains on its own batches; DDP averages the gradients with all_reduce after every backward, so
every rank ends with the same weights. Both are checked at the end: a wrong result exits non-zero.
python/tests/test_examples.py runs it; docs/pytorch.md is the guide.
"""

import torch
import torch.distributed as dist
import tprun.torch  # noqa: F401  registers the "tprun" backend (its entry point does too)


def main():
    dist.init_process_group("tprun")  # was: "gloo"
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    target = torch.linspace(-1, 1, 16)
    losses = []
    for _ in range(60):
        x = torch.randn(32, 16, generator=data)
        y = (x @ target).tanh().unsqueeze(1)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()  # DDP's all_reduce of the gradients runs here
        opt.step()
        losses.append(loss.item())

    # The same weights everywhere: compare with rank 0's.
    mine = torch.cat([p.detach().flatten() for p in model.parameters()])
    rank0 = mine.clone()
    dist.broadcast(rank0, src=0)
    assert torch.equal(mine, rank0), f"rank {rank}: weights differ from rank 0's"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 2, f"rank {rank}: the loss did not fall ({first:.4f} -> {last:.4f})"
    print(f"rank {rank}/{world}: loss {first:.4f} -> {last:.4f}, same weights as rank 0")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
