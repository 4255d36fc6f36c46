"""``oplora.memory_model.capture_memory``: the bytes each capture mode holds, counted before
training, against what the capture holds after real backward passes; and the capture itself
keeping q, k and v's X shared when rows without gradient are dropped (a causal LM's last
position), which the count assumes."""

import pytest
import torch

import oplora
from oplora.memory_model import capture_memory, lora_shapes

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config():
    return transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)


def peft_llama():
    torch.manual_seed(0)
    return peft.get_peft_model(transformers.LlamaForCausalLM(config()),
                               peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))


def accumulate(model, micro_batches, batch=2, seq=5):
    """Causal-LM passes; each sequence's last position has no gradient, but rows are dropped only at
    the step (``Capture.settle``: no host synchronisation in backward), so every LoRA layer holds
    ``batch * seq`` rows a pass until then."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(micro_batches):
        ids = torch.randint(0, 40, (batch, seq), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
    return batch * seq


@pytest.mark.parametrize("mode", ["rows", "dense", "auto"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_the_count_is_what_the_capture_holds(mode, micro_batches):
    model = peft_llama()
    opt = oplora.OPLoRA(model, lr=0.1, capture=mode)
    tokens = accumulate(model, micro_batches)
    est = capture_memory(model, tokens=tokens, micro_batches=micro_batches, activation_dtype=torch.float32)
    assert opt.capture_bytes() == {"rows": est.rows, "dense": est.dense, "auto": est.auto}[mode]
    assert est.held(mode) == opt.capture_bytes() + est.factor_grads
    if mode == "auto":  # at 1 micro-batch no layer folds, at 3 some do: both branches of the count
        folded = sum(site.folded is not None for site in opt._sites)
        assert est.folded == folded and (folded == 0) == (micro_batches == 1)
    opt.close()


@pytest.mark.parametrize("seq, copied", [(3, True), (5, False)])
def test_k_and_v_keep_one_copy_of_their_input_when_rows_are_dropped(seq, copied):
    """The step's settle drops each sequence's last position: 2 rows of 6 are copied out (one copy
    for k and v, which shared the X), 2 rows of 10 (at most a quarter) are left in place,
    uncounted. (q is left out: its first position's gradient, a softmax over one key, is exactly
    zero or rounding residue.)"""
    model = peft_llama()
    opt = oplora.OPLoRA(model, lr=0.1, capture="rows")
    accumulate(model, 1, seq=seq)
    attention = [s for s in opt._sites if "layers.0.self_attn" in s.name and s.name.split(".")[-1][0] in "kv"]
    assert len(attention) == 2 and all(len(s.chunks) == 1 for s in attention)
    xs = [s.chunks[0][0] for s in attention]
    assert xs[0].shape[0] == 2 * seq and len({x.untyped_storage().data_ptr() for x in xs}) == 1  # as backward left them
    opt._capture.settle()  # what the step does first
    after = [s.chunks[0][0] for s in attention]
    assert after[0].shape[0] == (2 * (seq - 1) if copied else 2 * seq) and all(s.rows == 2 * (seq - 1) for s in attention)
    assert len({x.untyped_storage().data_ptr() for x in after}) == 1  # one X for the two
    assert (after[0].untyped_storage().data_ptr() == xs[0].untyped_storage().data_ptr()) == (not copied)
    opt.close()


def test_shapes_from_a_config_on_the_meta_device_and_from_targets():
    est = capture_memory(config(), tokens=16, targets=TARGETS, r=4, activation_dtype=torch.float32)
    assert est.layers == 14 and est.lora_params == 2 * (4 * (32 + 32) * 2 + 4 * (16 + 32) * 2 + 4 * (64 + 32) * 3)
    shapes = lora_shapes(peft_llama())
    assert {s.reads for s in shapes if "layers.0.self_attn" in s.name and s.name.split(".")[-1][0] in "qkv"} == \
        {"base_model.model.model.layers.0.self_attn#0"}
    with pytest.raises(ValueError, match="no LoRA layer"):
        lora_shapes(transformers.LlamaForCausalLM(config()))
    with pytest.raises(ValueError, match="no nn.Linear"):
        capture_memory(config(), tokens=4, targets=["qproj"], r=4)


def test_llama_2_7b_every_linear_layer_16k_tokens():
    """The memory guide's table (docs/guide/memory.md): Llama-2-7B shapes, LoRA r16 on every linear layer, 8 x 2048 bf16
    tokens: the exact capture holds ~26 GiB with the rows and caps at the dense gradients (every
    layer folds), against 0.3 GiB of factor gradients for AdamW."""
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    est = capture_memory(cfg, tokens=2048, micro_batches=8, targets=TARGETS, r=16)
    gib = 2.0**30
    assert est.layers == 224 and est.folded == 224
    assert est.dense / gib == pytest.approx(4 * 32 * (4 * 4096**2 + 3 * 4096 * 11008) / gib)
    assert est.auto == est.dense and est.rows > est.dense
    assert est.factor_grads / gib == pytest.approx(4 * 16 * 32 * (4 * 8192 + 3 * (4096 + 11008)) / gib)


def test_the_memory_guide_table_is_what_the_example_prints(capsys):
    """docs/guide/memory.md's table at LLM scale comes from ``examples/memory_at_scale.py`` unchanged."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "examples"))
    import memory_at_scale

    assert memory_at_scale.main([]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(root, "docs", "guide", "memory.md")) as f:
        guide = f.read()
    assert printed.count("\n") == 14 and printed in guide


@pytest.mark.parametrize("sketch_rank, sketched", [(2, 14), (32, 0)])
@pytest.mark.parametrize("micro_batches", [3, 6])
def test_the_bounded_count_is_what_a_zero_budget_holds(sketch_rank, sketched, micro_batches):
    """``capture_budget=0``: every layer at the least of its rows, dense gradient and sketch (here
    a sketch of rank 2 is the least for all 14 layers, one of rank 32 for none: they fold densely),
    the same at 3 and 6 micro-batches."""
    model = peft_llama()
    opt = oplora.OPLoRA(model, lr=0.1, capture_budget=0, sketch_rank=sketch_rank)
    tokens = accumulate(model, micro_batches)
    est = capture_memory(model, tokens=tokens, micro_batches=micro_batches, activation_dtype=torch.float32,
                         sketch_rank=sketch_rank)
    assert opt.capture_bytes() == est.bounded and est.held("bounded") == est.bounded + est.factor_grads
    assert est.sketched == sketched == sum(type(s.folded).__name__ == "Sketch" for s in opt._sites)
    opt.close()
