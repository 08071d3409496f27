"""FoX layers in Megatron-Core's HybridModel (megatron-core >= 0.17, so the GPU machine's
0.19.2; the CPU CI's 0.16.1 has no HybridModel): the pattern "*-" * N with the weights of
an N-layer FoX GPTModel gives its loss and gradients, and trains through the Megatron path.

Runs only with MEGATRON_FOX_TEST_GPU=1 on a machine with CUDA.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from test_megatron_path import FLAGS, train  # tests/gpu is on sys.path (no package)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))
from workers import ROOT, tool_env  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("MEGATRON_FOX_TEST_GPU") != "1" or not torch.cuda.is_available()
    or importlib.util.find_spec("megatron.core.models.hybrid") is None,
    reason="needs a CUDA GPU and megatron-core with HybridModel")

TINY = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--ffn-hidden-size", "256", "--seq-length", "256", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--vocab-size", "300", "--device", "cpu", "--transformer-impl", "local"]


def _model(flags):
    from megatron_fox.training.arguments import parse_args
    from megatron_fox.training.model import build_model, padded_vocab_size, transformer_config

    args = parse_args(TINY + flags)
    return build_model(args, transformer_config(args, torch.device("cpu")), padded_vocab_size(300, args))


def _gpt_and_hybrid():
    """A 2-layer FoX GPTModel and the HybridModel "*-*-" holding its weights, on the GPU."""
    from megatron_fox.checkpoint import gpt_to_hybrid_names

    gpt = _model([])
    hybrid = _model(["--num-layers", "4", "--hybrid-layer-pattern", "*-*-"])
    with torch.no_grad():  # fast-forgetting gates: ACP prunes (default log_eps -10)
        for layer in gpt.decoder.layers:
            layer.self_attention.head_params.fgate_bias.uniform_(-3.0, 3.0)
    state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    mapped = gpt_to_hybrid_names(state)
    expected = {k for k in hybrid.state_dict() if not k.endswith("_extra_state")}
    assert set(mapped) == expected, set(mapped) ^ expected
    hybrid.load_state_dict(mapped, strict=False)
    return gpt.cuda(), hybrid.cuda()


def test_hybrid_pattern_equals_gpt_model(megatron_world):
    from megatron_fox.checkpoint import gpt_to_hybrid_names

    gpt, hybrid = _gpt_and_hybrid()
    tokens = torch.randint(0, 300, (2, 256), device="cuda")
    labels = torch.roll(tokens, -1, dims=1)
    losses = []
    for model in (gpt, hybrid):  # bf16 kernels under autocast: the same ops in the same order
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, None, None, labels=labels).float().mean()
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4), losses
    grads = gpt_to_hybrid_names({k: p.grad for k, p in gpt.named_parameters()})
    assert len(grads) == len(list(hybrid.parameters()))
    for name, p in hybrid.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_hybrid_model_decodes_like_gpt_model(megatron_world):
    """FoxGenerator on the HybridModel: cached decoding equals its full forward and the
    GPTModel's decoding, with ACP eviction on (QK-norm bound)."""
    from megatron_fox.inference import FoxGenerator

    gpt, hybrid = (m.eval() for m in _gpt_and_hybrid())
    tokens = torch.randint(0, 300, (2, 160), device="cuda")
    out = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for name, model in (("gpt", gpt), ("hybrid", hybrid)):
            gen = FoxGenerator(model, max_length=256, evict_log_eps=-10.0)
            cache = gen.new_cache()
            steps = [gen.forward(tokens[:, :100], cache)] + [gen.forward(tokens[:, t:t + 1], cache)
                                                              for t in range(100, 160)]
            out[name] = torch.cat(steps, dim=1)
            out[name + "_evicted"] = cache.evicted_keys()
        full = hybrid(tokens, None, None).float()
    assert len(out["hybrid_evicted"]) == 2 and out["hybrid_evicted"] == out["gpt_evicted"]
    torch.testing.assert_close(out["hybrid"], out["gpt"], rtol=0, atol=1e-3 * out["gpt"].abs().max().item())
    err = (out["hybrid"] - full).abs().max().item()
    assert err <= 2e-2 * full.abs().max().item(), err  # bf16: prompt kernel and decode step round differently


def test_hybrid_model_trains_and_resumes(tmp_path):
    """The CUDA Megatron path (DDP, distributed optimizer, schedule, dist_checkpointing)
    with a HybridModel: the loss falls and a resumed run follows the uninterrupted one."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    flags = ["--num-layers", "4", "--hybrid-layer-pattern", "*-*-", "--train-iters", "20"]
    full = train(tmp_path, "hybrid_full", flags)
    losses = [h["loss"] for h in full]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    ckpt = tmp_path / "ckpt"
    train(tmp_path, "hybrid_first", flags + ["--exit-interval", "10", "--save", str(ckpt)])
    rest = train(tmp_path, "hybrid_rest", flags + ["--load", str(ckpt)])
    assert [h["step"] for h in rest] == list(range(11, 21))
    for a, b in zip(full[10:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])


def test_hybrid_checkpoint_exports_to_gpt_names(tmp_path):
    """A HybridModel "*-*-" trained with --save, exported by convert_checkpoint from-megatron
    (GPTModel names), generates as a 2-layer GPTModel the text the HybridModel generates."""
    os.environ.setdefault("MEGATRON_FOX_CACHE", str(tmp_path / "cache"))
    hybrid = ["--num-layers", "4", "--hybrid-layer-pattern", "*-*-"]
    ckpt, full = tmp_path / "ckpt", tmp_path / "full.pt"
    train(tmp_path, "hybrid_save", hybrid + ["--train-iters", "10", "--save", str(ckpt)])

    def run(tool, *flags):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *flags], capture_output=True, text=True,
                           env=tool_env(), cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    run("convert_checkpoint.py", "from-megatron", "--input", str(ckpt), "--output", str(full), *FLAGS, *hybrid,
        "--vocab-size", "1024")
    prompt = ["--prompt", "import os\n", "--max-new-tokens", "32"]
    as_hybrid = run("generate.py", *FLAGS, *hybrid, "--load", str(ckpt), *prompt)
    as_gpt = run("generate.py", *FLAGS, "--pretrained-checkpoint", str(full), *prompt)
    assert as_gpt == as_hybrid and as_gpt.startswith("import os")
