"""Worker of the context-parallel tests: each rank runs its share, saves out and grads."""

import json
import os
import sys

import torch
import torch.distributed as dist


def main(opts):
    dist.init_process_group("gloo")
    from megatron_fox.parallel import context_parallel_forgetting_attention, split_for_context_parallel

    r, P = dist.get_rank(), dist.get_world_size()
    data = torch.load(opts["inputs"])
    parts = {n: split_for_context_parallel(data[n], 1, r, P).detach().requires_grad_() for n in ("q", "k", "v", "f")}
    o, stats = context_parallel_forgetting_attention(
        parts["q"], parts["k"], parts["v"], parts["f"], cp_group=dist.group.WORLD, log_eps=opts.get("log_eps"),
        logit_bound=opts.get("bound"), return_stats=True,
        cu_seqlens=torch.tensor(opts["cu"], dtype=torch.int32) if opts.get("cu") else None)
    do = split_for_context_parallel(data["do"], 1, r, P)
    grads = torch.autograd.grad(o, [parts[n] for n in ("q", "k", "v", "f")], do)
    torch.save({"o": o.detach(), "grads": grads, "stats": stats.__dict__},
               os.path.join(opts["out"], f"cp_{r}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
