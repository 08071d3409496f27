"""Megatron-LM's uneven pipeline split (--decoder-first/last-pipeline-num-layers): the layers
of each stage as Megatron-Core builds them, the trainer on such a split, its checkpoints."""

import itertools

import pytest
import torch

from megatron_fox.checkpoint import merge_state_dicts, shard_state_dict, stage_layers
from megatron_fox.training.arguments import ConfigError, parse_args

from .test_train import TINY, train


def _four_layers(flags: list) -> list:
    flags = list(flags)
    flags[flags.index("--num-layers") + 1] = "4"
    return flags


def _megatron_stages(num_layers, pp, first, last, embedding=False, loss=False):
    """[lo, hi) per stage from Megatron-Core's own get_transformer_layer_offset and
    get_num_layers_to_build (the reference; no parallel state needed with pp_rank given)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    config = TransformerConfig(num_layers=num_layers, hidden_size=16, num_attention_heads=2,
                               pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                               num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                               account_for_embedding_in_pipeline_split=embedding,
                               account_for_loss_in_pipeline_split=loss, use_cpu_initialization=True)
    out = []
    for rank in range(pp):
        lo = get_transformer_layer_offset(config, pp_rank=rank)
        out.append((lo, lo + get_num_layers_to_build(config, pp_rank=rank)))
    return out


@pytest.mark.parametrize("num_layers,pp", [(8, 2), (8, 4), (12, 4), (7, 3), (10, 4)])
def test_stage_layers_match_megatron_core(num_layers, pp):
    """Every split that both accept gives Megatron-Core's stage boundaries: an even one, a
    given first and/or last stage with the rest shared evenly."""
    checked = 0
    for first, last in itertools.product([None, 1, 2, 3], [None, 1, 2, 3]):
        try:
            ours = stage_layers(num_layers, pp, first, last)
        except ValueError:
            continue
        assert ours == _megatron_stages(num_layers, pp, first, last), (first, last)
        assert ours[0][0] == 0 and ours[-1][1] == num_layers and all(hi > lo for lo, hi in ours)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("num_layers,pp", [(7, 2), (6, 2), (6, 4), (10, 4), (14, 4), (5, 3)])
def test_stage_layers_accounting_for_embedding_and_loss_match_megatron_core(num_layers, pp):
    """--account-for-embedding/loss-in-pipeline-split: the embedding and the loss count as
    a layer each of an even split, as Megatron-Core builds it."""
    checked = 0
    for embedding, loss in [(True, False), (False, True), (True, True)]:
        try:
            ours = stage_layers(num_layers, pp, embedding=embedding, loss=loss)
        except ValueError:
            continue
        assert ours == _megatron_stages(num_layers, pp, None, None, embedding, loss), (embedding, loss)
        assert ours[-1][1] == num_layers and all(hi > lo for lo, hi in ours)
        checked += 1
    assert checked >= 1


def test_shards_of_an_uneven_split_merge_back():
    full = {f"decoder.layers.{i}.mlp.linear_fc2.weight": torch.randn(4, 6) for i in range(5)}
    full["embedding.word_embeddings.weight"] = torch.randn(8, 4)
    full["decoder.final_layernorm.weight"] = torch.randn(4)
    stages = stage_layers(5, 2, None, 1)  # 4 layers, then 1 and the final norm
    shards = {(tp, pp): shard_state_dict(full, 5, tp, 2, pp, 2, stages=stages) for tp in range(2) for pp in range(2)}
    assert sorted(k for k in shards[(0, 1)] if k.startswith("decoder.layers")) == ["decoder.layers.0.mlp.linear_fc2.weight"]
    assert torch.equal(shards[(1, 1)]["decoder.layers.0.mlp.linear_fc2.weight"],
                       full["decoder.layers.4.mlp.linear_fc2.weight"][:, 3:])
    merged = merge_state_dicts(shards, 5, 2, 2, stages)
    assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full)


@pytest.mark.parametrize("flags,key", [
    (["--decoder-first-pipeline-num-layers", "1"], "decoder_first_pipeline_num_layers"),  # PP = 1
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "0"],
     "decoder_first_pipeline_num_layers"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "4"], "num_layers"),
    (["--pipeline-model-parallel-size", "3", "--decoder-last-pipeline-num-layers", "1"], "num_layers"),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
      "--decoder-last-pipeline-num-layers", "2"], "num_layers"),
    (["--pipeline-model-parallel-size", "3"], "num_layers"),
    (["--account-for-loss-in-pipeline-split"], "account_for_loss_in_pipeline_split"),  # PP = 1
    (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split"], "num_layers"),  # 5 / 2
    (["--pipeline-model-parallel-size", "6", "--account-for-embedding-in-pipeline-split",
      "--account-for-loss-in-pipeline-split"], "account_for_embedding_in_pipeline_split"),  # (4 + 2) / 6 - 1 = 0
    (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split",
      "--decoder-last-pipeline-num-layers", "1"], "account_for_embedding_in_pipeline_split"),
])
def test_bad_pipeline_splits_name_the_key(flags, key):
    with pytest.raises(ConfigError) as e:
        parse_args(_four_layers(TINY) + flags)
    assert e.value.key == key, str(e.value)


def test_uneven_pipeline_trains_like_one_process(cache, tmp_path):
    """PP=2 with one layer on the first stage and three on the last (the embedding's stage
    lighter) trains like one process; its checkpoint's weights (rank files recording the
    split) load into one process and into the other uneven split alike, while a full resume
    into the other split stops naming 'load'."""
    common = ["--num-layers", "4", "--train-iters", "6", "--num-query-groups", "2", "--log-params-norm",
              "--log-interval", "3"]
    first1 = ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"]
    last1 = ["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "1"]
    single = train(tmp_path, "single", common)
    ckpt = tmp_path / "ckpt"
    uneven = train(tmp_path, "uneven", common + first1 + ["--save", str(ckpt)], world=2)
    for a, b in zip(single, uneven):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4), (a["step"], a["loss"], b["loss"])
        if "params_norm" in a:
            assert a["params_norm"] == pytest.approx(b["params_norm"], rel=1e-5), a["step"]
    tune = ["--num-layers", "4", "--train-iters", "1", "--num-query-groups", "2", "--load", str(ckpt), "--finetune"]
    one, other = train(tmp_path, "one", tune), train(tmp_path, "other", tune + last1, world=2)
    same = train(tmp_path, "same", tune + first1, world=2)
    assert one[0]["loss"] < single[0]["loss"] - 0.1  # the trained weights, not the init
    for run in (other, same):
        assert run[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    with pytest.raises(RuntimeError, match="another TP/PP/EP layout"):
        train(tmp_path, "resume", common + last1 + ["--train-iters", "8", "--load", str(ckpt)], world=2)
