"""Worker processes of the multi-process CPU tests (gloo).

    python tests/training/workers.py <task> '<json options>'
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the environment (see launch()).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import weakref

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def tool_env() -> dict:
    """Environment for a subprocess running this checkout's code: the repository first on
    PYTHONPATH, whatever was there after it (wheels installed with --target, say)."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")


def model_flags(opts: dict) -> list[str]:
    """Flags of the small model the equivalence tests use."""
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
             "--ffn-hidden-size", "128", "--seq-length", str(opts.get("seq", 32)), "--micro-batch-size", "2",
             "--global-batch-size", "4", "--make-vocab-size-divisible-by", "64", "--vocab-size", "128",
             "--tensor-model-parallel-size", str(opts.get("tp", 1)),
             "--pipeline-model-parallel-size", str(opts.get("pp", 1)),
             "--context-parallel-size", str(opts.get("cp", 1)), "--device", "cpu"]
    if opts.get("sp"):
        flags.append("--sequence-parallel")
    flags += ["--acp" if opts.get("acp", True) else "--no-acp"]
    return flags + opts.get("extra", [])


def _build(opts):
    from megatron.core import parallel_state as ps

    from megatron_fox.train import init_distributed
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    args = parse_args(model_flags(opts))
    device = init_distributed(args)
    model = build_model(args, transformer_config(args, device), padded_vocab_size(args.vocab_size, args))
    return args, model, ps


def task_init(opts):
    """Save a TP=1 model's full state dict (the shared weights)."""
    torch.manual_seed(opts["seed"])
    _, model, _ = _build(opts)
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}, opts["weights"])


def task_grads(opts):
    """Load the shared weights into this rank's shard, one global batch forward+backward;
    save (loss, grads of this shard) to out_<rank>.pt."""
    from megatron_fox.checkpoint import shard_state_dict
    from megatron_fox.training.model import pipeline_stages
    from megatron_fox.training.torch_engine import TorchEngine

    args, model, ps = _build(opts)
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    full = torch.load(opts["weights"])
    missing, unexpected = model.load_state_dict(
        shard_state_dict(full, args.num_layers, tp, args.tensor_model_parallel_size, pp,
                         args.pipeline_model_parallel_size, stages=pipeline_stages(args)), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    batches = torch.load(opts["batch"])
    from megatron_fox.training.step import context_parallel_part, with_documents

    if args.reset_attention_mask:
        batches = [with_documents(b, opts["eod"]) for b in batches]
    if args.context_parallel_size > 1:
        batches = [context_parallel_part(b) for b in batches]
    if args.fox_context_pruning:
        from megatron_fox.layers.context_pruning import set_context_pruning_state
        from megatron_fox.training.step import context_pruning_alpha_at

        set_context_pruning_state(model, alpha=context_pruning_alpha_at(0, args))
    engine = TorchEngine(model, args, eod=opts["eod"])
    loss_sum, tokens = engine.gradients(batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save({"loss": engine._reduce_loss(loss_sum, tokens), "grads": grads, "tp": tp, "pp": pp,
                "cp": ps.get_context_parallel_rank()},
               os.path.join(opts["out"], f"out_{torch.distributed.get_rank()}.pt"))


def task_penalty_fd(opts):
    """Learned context pruning: the engine's gradient of each layer's beta against a central
    difference of J = loss + lambda * mean over layers of the kept fraction (both from
    forward passes), one micro-batch on one rank; saves [(grad, difference)] per layer."""
    from megatron_fox.layers.context_pruning import context_pruning_modules, set_context_pruning_state
    from megatron_fox.training.step import with_documents
    from megatron_fox.training.torch_engine import TorchEngine

    torch.manual_seed(opts["seed"])
    args, model, _ = _build(opts)
    set_context_pruning_state(model, alpha=args.fox_context_pruning_alpha)
    batch = [with_documents(torch.load(opts["batch"])[0], opts["eod"])]
    engine = TorchEngine(model, args, eod=opts["eod"])
    engine.gradients(batch)
    mods = context_pruning_modules(model)
    grads = [m.beta.grad.item() for m in mods]

    def objective():
        loss = engine.eval_step(batch)
        return loss + args.fox_context_pruning_lambda * sum(float(m.last_kept_fraction) for m in mods) / len(mods)

    out, h = [], 1e-2
    for m, g in zip(mods, grads):
        with torch.no_grad():
            m.beta += h
            up = objective()
            m.beta -= 2 * h
            down = objective()
            m.beta += h
        out.append((g, (up - down) / (2 * h)))
    torch.save(out, opts["out"])


def task_train(opts):
    """Run the trainer; rank 0 saves its history to opts['out']. With opts['gc_events']:
    also, in order, every garbage collection ("collect", generation, automatic collection
    enabled) and step ("step", n, enabled), then ("after", enabled), to that file. With
    opts['cyclic_tensors']: the number of tensors each step left in reference cycles."""
    from megatron_fox.train import run
    from megatron_fox.training.arguments import parse_args

    events, cyclic = [], []
    if opts.get("gc_events"):
        gc.callbacks.append(lambda phase, info: phase == "start" and events.append(
            ("collect", info["generation"], gc.isenabled())))

    def on_step(step, _):
        events.append(("step", step, gc.isenabled()))
        if opts.get("cyclic_tensors"):  # tensors that only a collection would free, found since the last step
            gc.set_debug(gc.DEBUG_SAVEALL)  # the unreachable objects go to gc.garbage instead
            gc.collect()
            # type(), not isinstance: the garbage can hold weak proxies of freed objects (the
            # CUDA path's), whose attribute lookups raise ReferenceError
            cyclic.append(sum(1 for o in gc.garbage if issubclass(type(o), torch.Tensor)))
            gc.set_debug(0)
            gc.garbage.clear()
            gc.collect()

    history = run(parse_args(opts["flags"]), on_step=on_step)
    if torch.distributed.get_rank() == 0:
        torch.save(history, opts["out"])
        if opts.get("gc_events"):
            torch.save(events + [("after", gc.isenabled())], opts["gc_events"])
        if opts.get("cyclic_tensors"):
            torch.save(cyclic, opts["cyclic_tensors"])


def task_valid_loss(opts):
    """Mean token loss of the validation batches (eval_iters global batches, as the trainer
    takes them) under the latest checkpoint of opts['ckpt'], by plain model calls; no
    document resets (the run uses --no-reset-attention-mask)."""
    from megatron_fox.train import build_data, build_model_and_engine, init_distributed
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.step import global_batch

    args = parse_args(opts["flags"] + ["--load", opts["ckpt"]])
    device = init_distributed(args)
    _, valid, _, tokenizer = build_data(args)
    model, _, step, _ = build_model_and_engine(args, device, tokenizer)
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for e in range(args.eval_iters):
            for mb in global_batch(valid, e, args, tokenizer.eod):
                loss = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
                total += float((loss.float() * mb["loss_mask"]).sum())
                count += float(mb["loss_mask"].sum())
    torch.save({"step": step, "loss": total / count}, opts["out"])


def task_cp(opts):
    """Context-parallel op on this rank's chunks of the saved inputs; save out, grads, stats."""
    import torch.distributed as dist

    from megatron_fox.ops.forgetting_attn import boundary
    from megatron_fox.parallel import context_parallel_forgetting_attention, split_for_context_parallel

    lse_thresholds = []  # the backward's lse rule reached the kernels' boundary search
    real = boundary.lse_threshold
    boundary.lse_threshold = lambda *a: lse_thresholds.append(1) or real(*a)
    starts = []  # first key block of each query block, every kernel launch
    real_start = boundary.key_block_start

    def key_block_start(*a, **kw):
        start = real_start(*a, **kw)
        starts.append(int(start.sum()))
        return start

    boundary.key_block_start = key_block_start
    dist.init_process_group("gloo")
    r, P = dist.get_rank(), dist.get_world_size()
    data = torch.load(opts["inputs"])
    parts = {n: split_for_context_parallel(data[n], 1, r, P).detach().requires_grad_() for n in ("q", "k", "v", "f")}
    o, stats = context_parallel_forgetting_attention(
        parts["q"], parts["k"], parts["v"], parts["f"], cp_group=dist.group.WORLD, log_eps=opts.get("log_eps"),
        logit_bound=opts.get("bound"), return_stats=True, skip_chunks=opts.get("skip_chunks", True),
        backward_pruning=opts.get("backward_pruning", "bound"),
        cu_seqlens=torch.tensor(opts["cu"], dtype=torch.int32) if opts.get("cu") else None)
    do = split_for_context_parallel(data["do"], 1, r, P)
    grads = torch.autograd.grad(o, [parts[n] for n in ("q", "k", "v", "f")], do)
    torch.save({"o": o.detach(), "grads": grads, "stats": stats.__dict__, "lse_thresholds": len(lse_thresholds),
                "start_blocks": sum(starts)},
               os.path.join(opts["out"], f"cp_{r}.pt"))


def task_chunk_shift(opts):
    """The KV-shift of this rank's chunks with each chunk's predecessor row from
    `chunk_boundary_rows`; save the shifted columns and d mixed."""
    import torch.distributed as dist

    from megatron_fox.ops.token_shift import token_shift
    from megatron_fox.parallel import chunk_boundary_rows, split_for_context_parallel

    dist.init_process_group("gloo")
    r, P = dist.get_rank(), dist.get_world_size()
    data = torch.load(opts["inputs"])
    groups, start, cols = opts["groups"], opts["start"], opts["cols"]
    mixed = split_for_context_parallel(data["mixed"], 0, r, P).detach().requires_grad_()
    linked, prev = chunk_boundary_rows(mixed * 1.0, dist.group.WORLD, groups, start, cols)
    s, b = mixed.shape[:2]
    x = linked.view(s, b, groups, -1)[..., start:start + cols]
    y = token_shift(x, split_for_context_parallel(data["alpha"], 0, r, P),
                    split_for_context_parallel(data["doc_start"], 0, r, P), prev)
    (d_mixed,) = torch.autograd.grad(y, mixed, split_for_context_parallel(data["dy"], 0, r, P))
    torch.save({"y": y.detach(), "d_mixed": d_mixed}, os.path.join(opts["out"], f"chunk_shift_{r}.pt"))


def task_cp_memory(opts):
    """The ring op called several times with one ChunkSkipMemory (as a layer does), on the
    saved inputs of each call; save each call's out, grads and whether it waited/skipped."""
    import torch.distributed as dist

    from megatron_fox.parallel import ChunkSkipMemory, context_parallel_forgetting_attention, split_for_context_parallel

    dist.init_process_group("gloo")
    r, P = dist.get_rank(), dist.get_world_size()
    memory = ChunkSkipMemory()
    calls = []
    gc.disable()  # what a call keeps alive must go with its last reference, not at a later collection
    for data in torch.load(opts["inputs"]):
        parts = {n: split_for_context_parallel(data[n], 1, r, P).detach().requires_grad_() for n in ("q", "k", "v", "f")}
        q = parts["q"] * 1.0  # a tensor of this call only
        o, stats = context_parallel_forgetting_attention(
            q, parts["k"], parts["v"], parts["f"], cp_group=dist.group.WORLD, log_eps=-10.0,
            logit_bound=opts["bound"], return_stats=True, skip_memory=memory)
        do = split_for_context_parallel(data["do"], 1, r, P)
        grads = torch.autograd.grad(o, [parts[n] for n in ("q", "k", "v", "f")], do)
        q_alive = weakref.ref(q)
        del q
        calls.append({"o": o.detach(), "grads": grads, "waited": stats.table_waited, "skipped": stats.blocks_skipped,
                      "not_sent": stats.bytes_not_sent, "fraction": float(stats.skipped_fraction)})
        del o
        calls[-1]["q_freed"] = q_alive() is None
    gc.enable()
    torch.save(calls, os.path.join(opts["out"], f"cp_memory_{r}.pt"))


def task_cp_a2a(opts):
    """Head-parallel (a2a) op on this rank's chunks of the saved inputs; save out, grads, heads."""
    import torch.distributed as dist

    from megatron_fox.parallel import HeadCostMemory, head_parallel_forgetting_attention, split_for_context_parallel

    dist.init_process_group("gloo")
    r, P = dist.get_rank(), dist.get_world_size()
    data = torch.load(opts["inputs"])
    parts = {n: split_for_context_parallel(data[n], 1, r, P).detach().requires_grad_() for n in ("q", "k", "v", "f")}
    bound = opts.get("bound")
    if opts.get("bound_per_head"):
        bound = torch.tensor(opts["bound_per_head"])
    kw = dict(cp_group=dist.group.WORLD, log_eps=opts.get("log_eps"), logit_bound=bound, return_stats=True,
              balance=opts.get("balance", True),
              cu_seqlens=torch.tensor(opts["cu"], dtype=torch.int32) if opts.get("cu") else None)
    first_heads = None
    if opts.get("memory"):  # a first call on other gates; the real call deals by its costs
        kw["cost_memory"] = HeadCostMemory()
        first = [parts[n].detach() for n in ("q", "k", "v")] + [split_for_context_parallel(data["f_first"], 1, r, P)]
        first_heads = head_parallel_forgetting_attention(*first, **kw)[1].heads
    o, stats = head_parallel_forgetting_attention(parts["q"], parts["k"], parts["v"], parts["f"], **kw)
    do = split_for_context_parallel(data["do"], 1, r, P)
    grads = torch.autograd.grad(o, [parts[n] for n in ("q", "k", "v", "f")], do)
    torch.save({"o": o.detach(), "grads": grads, "heads": stats.heads, "skipped": float(stats.skipped_fraction),
                "bytes_sent": stats.bytes_sent, "first_heads": first_heads}, os.path.join(opts["out"], f"cp_a2a_{r}.pt"))


def task_save(opts):
    """This rank's shard of the model, each weight scaled by a factor of its full name (so
    the saved model is not the initial one, the same for every layout), saved as
    megatron_fox.train --save does: opts["format"] "files" (the CPU engine's per-rank
    files) or "dist" (dist_checkpointing, as the CUDA engine) at iteration 5."""
    import zlib

    from megatron_fox.checkpoint import global_name, iteration_dir, write_latest
    from megatron_fox.training.model import pipeline_stages

    torch.manual_seed(opts["seed"])
    args, model, ps = _build(opts)
    offset = pipeline_stages(args)[ps.get_pipeline_model_parallel_rank()][0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = global_name(name, offset)
            p.mul_(1.0 + (zlib.crc32(full.encode()) % 1000) / 1000.0)
    root = opts["root"]
    if opts["format"] == "files":
        from megatron_fox.training.torch_engine import TorchEngine

        TorchEngine(model, args, eod=0).save(root, 5)
        return
    from megatron.core import dist_checkpointing

    torch.cuda.synchronize = lambda *a, **k: None  # its writer syncs CUDA; nothing to wait for on CPU
    path = iteration_dir(root, 5)
    os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
    write_latest(root, 5)


def task_fail_or_hang(opts):
    """The launcher's own test: rank 0 fails at once, every other rank waits as if for it."""
    import time

    if os.environ["RANK"] == "0":
        raise ValueError(opts["message"])
    time.sleep(3600)


def task_cli(opts):
    """`python <script> args...` or `python -m <module> args...` (opts["argv"], what follows
    the interpreter): sys.argv and sys.path[0] set as the interpreter sets them, the code run
    as __main__."""
    import runpy

    argv = opts["argv"]
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # run_module puts the module's file in argv[0]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


def run_python(argv: list, env: dict | None = None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python *argv` in a process of its own, as subprocess.run(capture_output=True,
    text=True) runs it: its exit code, stdout and stderr. Forked from the zygote (the
    imports of torch and Megatron-Core done: ~10 s of CPU less a launch; the command's own
    modules, megatron_fox and the tools, are imported fresh under env), else (and for
    interpreter options other than -m) a fresh interpreter. env defaults to tool_env()."""
    import tempfile

    env = tool_env() if env is None else env
    cwd = os.getcwd() if cwd is None else str(cwd)
    zygote = _zygote() if argv[0] == "-m" or not str(argv[0]).startswith("-") else None
    if zygote is not None and env.get("TRITON_INTERPRET") == "1" != os.environ.get("TRITON_INTERPRET"):
        zygote = None  # Triton's own jit functions were made at the zygote's import without the interpreter
    if zygote is None:
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="mf_cli_") as logs:
        out, err = os.path.join(logs, "stdout"), os.path.join(logs, "stderr")
        proc = zygote.start([__file__, "cli", json.dumps({"argv": [str(a) for a in argv]})], env, err, out=out,
                            cwd=cwd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess([sys.executable, *argv], code, f_out.read(), f_err.read())


def sigterm_at_step(cmd, step, env, cwd):
    """Run cmd, send SIGTERM once its log shows `step`, wait: (process, all its output)."""
    import re

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.match(rf"step +{step} \|", line):
            proc.send_signal(signal.SIGTERM)
            break
    return proc, "".join(lines) + proc.communicate(timeout=300)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(task: str, world: int, opts: dict, timeout: int = 900) -> None:
    """Start `world` worker processes of `task`; raise with their stderr if one fails.

    Output goes to files, not pipes, and each worker is waited for by its exit: a process
    a worker leaves behind (it skips interpreter teardown) cannot keep the caller waiting
    for the end of a pipe. The rendezvous store is served from this process on a port the
    system picked and that stays bound, as torchrun's agent serves it
    (TORCHELASTIC_USE_AGENT_STORE: every rank a client): no port is found free and then
    lost to another process before rank 0 binds it (tests run beside each other)."""
    import datetime

    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=timeout))
    try:
        _launch_once(task, world, opts, timeout, store.port)
    finally:
        del store


def _launch_once(task: str, world: int, opts: dict, timeout: int, port: int) -> None:
    """One start of the workers. All are watched together: once one exits with an error the
    others get GRACE_S to end (a peer blocked in a collective or a pipeline receive never
    would), then each still running dumps its Python stacks (SIGUSR1) into its stderr and is
    killed; the error names every rank's exit and the end of its stderr."""
    import tempfile
    import time

    logs = tempfile.TemporaryDirectory(prefix=f"mf_{task}_")
    zygote = _zygote()
    procs, errs = [], []
    codes: dict[int, int] = {}
    try:
        for rank in range(world):
            env = dict(tool_env(), OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                       TRITON_INTERPRET=opts.get("interpret", "0"))
            err = os.path.join(logs.name, f"rank{rank}.err")
            errs.append(err)
            argv = [__file__, task, json.dumps(opts)]
            if zygote is not None:
                procs.append(zygote.start(argv, env, err))
            else:
                with open(err, "w") as f:
                    procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.DEVNULL,
                                                  stderr=f))
        deadline = time.monotonic() + timeout
        while len(codes) < world:
            for rank, p in enumerate(procs):
                if rank not in codes:
                    try:
                        codes[rank] = p.wait(timeout=0.1)
                    except subprocess.TimeoutExpired:
                        pass
            if any(codes.values()):
                deadline = min(deadline, time.monotonic() + GRACE_S)
            if len(codes) < world and time.monotonic() > deadline:
                break
        if len(codes) == world and not any(codes.values()):
            return
        hung = [rank for rank in range(world) if rank not in codes]
        for rank in hung:
            procs[rank].send_signal(signal.SIGUSR1)
        time.sleep(2.0 if hung else 0.0)
        reports = []
        for rank in range(world):
            with open(errs[rank]) as f:
                tail = f.read()[-3000:]
            state = f"exit {codes[rank]}" if rank in codes else "timed out" if not any(codes.values()) else \
                "still running after another rank failed"
            reports.append(f"rank {rank} {state}:\n{tail}")
        raise RuntimeError(f"{task} failed:\n" + "\n".join(reports))
    finally:  # whatever ended the launch (the harness's own errors too), no worker outlives it
        for rank, p in enumerate(procs):
            if rank not in codes:
                p.kill()
                try:
                    p.wait(timeout=30)
                except (subprocess.TimeoutExpired, RuntimeError):
                    pass
        logs.cleanup()


GRACE_S = 30.0


class _Zygote:
    """A process that imported torch and Megatron-Core once and forks each worker from
    there: a worker then starts in a few milliseconds instead of the ~5 s of CPU those
    imports cost every fresh interpreter (the multi-process tests start hundreds). It
    imports nothing of megatron_fox, so a worker still defines the kernels under its own
    TRITON_INTERPRET. MEGATRON_FOX_TEST_FORK=0 starts every worker as a fresh process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "--zygote"],
                                     env=dict(tool_env(), OMP_NUM_THREADS="1"), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.exits: dict[int, int] = {}
        self.reader = _LineReader(self.proc.stdout.fileno())
        while self._line(300) != "ready":  # whatever the imports printed
            pass

    def _line(self, timeout: float) -> str:
        line = self.reader.line(timeout)
        if line is None:
            raise RuntimeError("the test zygote died")
        return line

    def _send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def _reply(self, timeout: float) -> int | None:
        """The pid of a "pid" line, or None after recording an "exit" line."""
        kind, pid, *code = self._line(timeout).split()
        if kind == "pid":
            # the new worker cannot have been reaped yet: an exit kept under its pid is that
            # of an earlier worker (killed, never waited for) whose pid the system reused
            self.exits.pop(int(pid), None)
            return int(pid)
        self.exits[int(pid)] = int(code[0])
        return None

    def start(self, argv: list, env: dict, err: str, out: str | None = None, cwd: str | None = None) -> "_Forked":
        self._send({"argv": argv, "env": env, "err": err, "out": out, "cwd": cwd or os.getcwd()})
        while (pid := self._reply(60)) is None:  # exits of earlier workers may come first
            pass
        return _Forked(self, pid)

    def wait(self, pid: int, timeout: float) -> int:
        import time

        deadline = time.monotonic() + timeout
        while pid not in self.exits:
            self._reply(deadline - time.monotonic())
        return self.exits.pop(pid)


class _Forked:
    """A worker forked by the zygote, waited for, signalled and killed like a subprocess.Popen."""

    def __init__(self, zygote: _Zygote, pid: int):
        self.zygote, self.pid = zygote, pid
        self.code: int | None = None

    def wait(self, timeout: float) -> int:
        if self.code is None:
            self.code = self.zygote.wait(self.pid, timeout)
        return self.code

    def send_signal(self, sig: int) -> None:
        if self.code is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_ZYGOTE: list = []


class _LineReader:
    """Lines from a file descriptor, read unbuffered so that select() sees what is left (a
    buffered reader may hold several lines while select waits on an empty pipe). A line
    that arrives in pieces is kept whole across timeouts."""

    def __init__(self, fd: int):
        self.fd, self.pending = fd, b""

    def line(self, timeout: float) -> str | None:
        """The next line without its newline; None at end of file; TimeoutExpired if no
        whole line came within timeout seconds (what came of it stays for the next call)."""
        import select
        import time

        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            if not select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise subprocess.TimeoutExpired("zygote", timeout)
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode().strip()


def _zygote() -> _Zygote | None:
    """This test process's zygote (started on first use), or None where workers should be
    fresh processes: MEGATRON_FOX_TEST_FORK=0, no fork on this platform, or CUDA present
    (Megatron-Core's imports ask CUDA for its devices, after which torch refuses CUDA in a
    forked child)."""
    if os.environ.get("MEGATRON_FOX_TEST_FORK", "1") == "0" or not hasattr(os, "fork") or torch.cuda.is_available():
        return None
    if not _ZYGOTE or _ZYGOTE[0].proc.poll() is not None:
        _ZYGOTE[:] = [_Zygote()]
    return _ZYGOTE[0]


def _zygote_main() -> None:
    """The zygote's loop: a request (one JSON line: argv, env, err, out, cwd) forks a worker
    and answers "pid <pid>"; a finished worker is reported as "exit <pid> <code>"."""
    import megatron.core.dist_checkpointing  # noqa: F401  the imports every worker shares
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401

    print("ready", flush=True)
    reader = _LineReader(0)
    while True:
        try:
            line = reader.line(0.05)
        except subprocess.TimeoutExpired:
            line = ""
        if line is None:
            return
        if line:
            request = json.loads(line)  # before the fork: a bad request ends the zygote, loudly
            pid = os.fork()
            if pid == 0:
                _forked_worker(request)
            print(f"pid {pid}", flush=True)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def _forked_worker(request: dict) -> None:
    """In the forked child: become the worker a fresh `python workers.py task opts` would
    be (environment, import path, working directory, output, argv, random state), run it, exit."""
    import importlib
    import random
    import traceback

    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if request.get("out") else null
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        # a PYTHONPATH the zygote did not start with (a test's stand-in package) goes first
        added = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
        sys.path[:0] = added
        importlib.invalidate_caches()
        sys.argv = request["argv"]
        random.seed()
        _run_task(sys.argv[1], json.loads(sys.argv[2]))
        code = 0
    except SystemExit as e:  # as the interpreter ends on one: None is 0, a message goes to stderr
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run_task(task: str, opts: dict) -> None:
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung worker's stacks, before it is killed
    globals()[f"task_{task}"](opts)
    if torch.distributed.is_initialized():
        # no rank leaves while a peer still talks to it; then both callers end the process
        # with os._exit, so the group is never torn down (gloo's teardown is where workers
        # once aborted after a passing run, and destroy_process_group can hang)
        torch.distributed.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        _zygote_main()
        sys.exit(0)
    _run_task(sys.argv[1], json.loads(sys.argv[2]))
    # the results are saved and every rank is past the barrier: skip the interpreter's
    # teardown, where gloo's threads once aborted a worker (SIGABRT) after a passing run
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
