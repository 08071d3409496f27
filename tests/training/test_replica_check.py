"""--check-weight-hash-across-dp-replicas-interval: the weights' hashes and their comparison."""

import pytest
import torch

from megatron_fox.training import replica_check

from .test_train import train


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2, bias=False)).to(torch.bfloat16)


def test_hash_changes_with_one_ulp_and_names_the_parameter():
    a, b = _model(), _model()
    names, ha = replica_check.weight_hashes(a.named_parameters())
    assert names == ["0.weight", "0.bias", "1.weight"] and ha.shape == (3, 32) and ha.dtype == torch.uint8
    assert torch.equal(ha, replica_check.weight_hashes(b.named_parameters())[1])  # same bytes, same hashes
    with torch.no_grad():  # one element one bf16 step up
        w = b[1].weight.view(torch.int16)
        w[0, 0] += 1
    hb = replica_check.weight_hashes(b.named_parameters())[1]
    assert replica_check.mismatches(names, [ha, ha, hb]) == ["1.weight"]
    assert replica_check.mismatches(names, [ha, ha]) == []


def test_check_stops_naming_the_weights_that_differ(monkeypatch):
    """check_weight_replicas with the data-parallel gather replaced by one that hands back a
    replica whose bias differs: RuntimeError naming it; equal replicas pass."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model, other = _model(), _model()
    with torch.no_grad():
        other[0].bias.add_(1.0)
    replicas = [other]
    monkeypatch.setattr(ps, "get_data_parallel_group", lambda **kw: "dp")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)

    def gather(out, table, group=None):
        out[0].copy_(table)
        out[1].copy_(replica_check.weight_hashes(replicas[0].named_parameters())[1])

    monkeypatch.setattr(dist, "all_gather", gather)
    with pytest.raises(RuntimeError, match=r"step 7: weights differ .*: 0\.bias$"):
        replica_check.check_weight_replicas(model, 7, torch.device("cpu"))
    replicas[0] = _model()
    replica_check.check_weight_replicas(model, 8, torch.device("cpu"))


def test_data_parallel_training_passes_the_check(cache, tmp_path):
    """DP=2 keeps equal replicas: the check after every step passes (the hashes are of the
    weights' bytes, so any difference at all would stop the run)."""
    flags = ["--train-iters", "3", "--log-interval", "1", "--check-weight-hash-across-dp-replicas-interval", "1"]
    hist = train(tmp_path, "checked", flags, world=2)
    assert [h["step"] for h in hist] == [1, 2, 3] and all(h["loss"] > 0 for h in hist)
