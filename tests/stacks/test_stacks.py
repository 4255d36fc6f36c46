"""The stacks fine-tuners train in, each on a tiny model, against a plain loop over the same batches:

* TRL's ``SFTTrainer`` and ``DPOTrainer`` (a PEFT model; DPO's reference model is the same model
  with its adapter disabled, whose forward must not be captured);
* PyTorch Lightning (``configure_optimizers``, ``gradient_clip_val``, ``accumulate_grad_batches``,
  and Lightning's ``optimizer.step(closure)``);
* a torchtune loop: its own ``LoRALinear`` modules (captured: the same branch as PEFT's),
  ``DoRALinear`` refused by name, its recipes' summed loss rescaled by ``scale_grads`` after the
  micro-batches.

Nothing of these libraries is re-implemented: the plain loops call their losses and batches.
"""

import os
import warnings

import pytest
import torch
from torch import nn

import oplora

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(got, want, rtol=1e-4, atol=1e-5):
    """Equal to float32 rounding: the stacks reduce their losses in another order than the plain
    loops (TRL divides a token sum by the Trainer's count; DPO's gradient is a small difference of
    the chosen and rejected ones), which shows at 1e-6 of the factors after a few steps of lr 0.1;
    a missed or doubled micro-batch, a lost rescale or a captured reference pass shows at 1e-2."""
    assert got.keys() == want.keys() and got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def moved(after, before):
    return all(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k or "lora_b" in k)


# ---------------------------------------------------------------------------------------- TRL

def tokenizer():
    """A word-level tokenizer built in memory (nothing downloaded): <pad>, <eos>, <bos>, w0..w36."""
    import tokenizers
    import transformers

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(37)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>")


def tiny_peft_llama():
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)


def words(gen, k):
    return " ".join(f"w{int(i)}" for i in torch.randint(3, 40, (k,), generator=gen))


def trl_args(trl, config, tmp_path, exact, **kw):
    """TRL's config for 3 steps of the whole data set in order. ``exact``: float32 without
    activation checkpointing, as the plain loop runs; otherwise TRL's defaults (bf16 autocast and
    gradient checkpointing on)."""
    if exact:
        kw.update(bf16=False, gradient_checkpointing=False)
    return getattr(trl, config)(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[],
                                use_cpu=True, save_strategy="no", lr_scheduler_type="constant", max_grad_norm=0.0,
                                disable_tqdm=True, seed=0, train_sampling_strategy="sequential", **kw)


def checking_steps(opt, rtol):
    """Wrap ``opt.step``: before each step, the captured rows must reproduce autograd's factor
    gradients (``grad_A = B^T G``, ``grad_B = G A^T``), one forward pass per layer (DPO's reference
    pass, adapter disabled, is not captured). Returns the list of checked steps."""
    checked, step = [], opt.step

    def wrapped(*args, **kwargs):
        for site in opt._sites:
            assert site.passes == 1, site.name
            g = sum(sd.double().T @ x.double() for x, sd, _ in site.chunks)
            if site.folded is not None:
                g = g + site.folded.g.double()
            a, b = site.A.detach().double(), site.B.detach().double()
            for grad, want in ((site.A.grad, b.T @ g), (site.B.grad, g @ a.T)):
                assert float((grad.double() - want).norm()) <= rtol * float(want.norm()) + 1e-12, site.name
        checked.append(True)
        return step(*args, **kwargs)

    opt.step = wrapped
    return checked


def sft_data(datasets):
    gen = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"text": [words(gen, 10) for _ in range(8)]})


def dpo_data(datasets):
    gen = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"prompt": [words(gen, 5) for _ in range(8)],
                                       "chosen": [words(gen, 4) for _ in range(8)],
                                       "rejected": [words(gen, 4) for _ in range(8)]})


def trl_trainer(trl, kind, model, opt, data, tmp_path, exact):
    config = "SFTConfig" if kind == "sft" else "DPOConfig"
    cls = trl.SFTTrainer if kind == "sft" else trl.DPOTrainer
    args = trl_args(trl, config, tmp_path, exact, logging_strategy="steps", logging_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' gradient_checkpointing_* renames
        return cls(model=model, args=args, train_dataset=data, processing_class=tokenizer(), optimizers=(opt, None))


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_trainers_step_as_a_plain_loop(tmp_path, kind):
    """In float32 without checkpointing, 3 steps of TRL's trainer equal 3 steps of a plain loop on
    its batches and its loss (``trainer.compute_loss``; SFT: the model's own loss). DPO's
    reference log-probabilities come from the same model with its adapter disabled: that forward
    is not captured."""
    trl = pytest.importorskip("trl")
    data = (sft_data if kind == "sft" else dpo_data)(pytest.importorskip("datasets"))
    runs = []
    for plain in (False, True):
        model = tiny_peft_llama()
        start = factors(model)
        opt = oplora.OPLoRA(model, lr=0.1, seed=0)
        trainer = trl_trainer(trl, kind, model, opt, data, tmp_path / str(plain), exact=True)
        checked = checking_steps(opt, rtol=1e-5)
        if not plain:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                trainer.train()
        else:
            batch = next(iter(trainer.get_train_dataloader()))  # every step is the whole data set, in order
            for _ in range(3):
                opt.zero_grad()
                loss = model(**batch).loss if kind == "sft" else trainer.compute_loss(model, batch)
                loss.backward()
                opt.step()
        assert len(checked) == 3 and moved(factors(model), start)
        runs.append(factors(model))
        opt.close()
    assert_same(runs[0], runs[1])


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_trl_trainers_with_their_defaults_bf16_autocast_and_checkpointing(tmp_path, kind):
    """TRL's defaults run the forward under bf16 autocast with gradient checkpointing: the capture
    still reproduces autograd's factor gradients at every step (to bf16 rounding), and it trains
    (DPO: the reward margin grows)."""
    trl = pytest.importorskip("trl")
    data = (sft_data if kind == "sft" else dpo_data)(pytest.importorskip("datasets"))
    model = tiny_peft_llama()
    opt = oplora.OPLoRA(model, lr=0.1, seed=0)
    trainer = trl_trainer(trl, kind, model, opt, data, tmp_path, exact=False)
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing
    checked = checking_steps(opt, rtol=2e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer.train()
    assert len(checked) == 3
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    if kind == "dpo":
        margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
        assert margins[-1] > margins[0]


# ----------------------------------------------------------------------------------- Lightning

def lightning_case():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 3))
    oplora.add_lora(net, ["0"], r=3, alpha=6)
    net[2].requires_grad_(True)  # a head trained by the other optimizer
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(10, 12, generator=gen), torch.randint(0, 3, (10,), generator=gen)) for _ in range(6)]
    return net, batches


def test_lightning_clipping_and_accumulation_step_as_a_plain_loop(tmp_path):
    lightning = pytest.importorskip("lightning")
    net, batches = lightning_case()

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, index):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return oplora.ScaledOPLoRA(self.net, lr=0.01, bias_correction=True, relative_damping=True, seed=0)

    trainer = lightning.Trainer(max_steps=3, accumulate_grad_batches=2, gradient_clip_val=0.05, accelerator="cpu",
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=str(tmp_path))
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False))
    assert trainer.global_step == 3

    plain, _ = lightning_case()
    opt = oplora.ScaledOPLoRA(plain, lr=0.01, bias_correction=True, relative_damping=True, seed=0)
    params = [p for g in opt.param_groups for p in g["params"]]
    norms = []
    for step in range(3):
        opt.zero_grad()
        for x, y in batches[2 * step:2 * step + 2]:
            (nn.functional.cross_entropy(plain(x), y) / 2).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.05)))
    # (before each step: the clipping must have acted for the comparison to test it)
        opt.step()
    assert min(norms) > 0.05
    assert_same(factors(net), factors(plain))


# ----------------------------------------------------------------------------------- torchtune

def torchtune_model(**kw):
    llama2 = pytest.importorskip("torchtune.models.llama2")
    peft_utils = pytest.importorskip("torchtune.modules.peft")
    torch.manual_seed(0)
    model = llama2.lora_llama2(lora_attn_modules=["q_proj", "v_proj"], vocab_size=40, num_layers=2, num_heads=2,
                               num_kv_heads=2, embed_dim=32, max_seq_len=16, lora_rank=4, lora_alpha=8, **kw)
    for _, module in model.named_modules():  # B = 0 (torchtune's init) would leave nothing to compare at step 1
        if hasattr(module, "lora_b"):
            nn.init.normal_(module.lora_b.weight, std=0.1)
    peft_utils.set_trainable_params(model, peft_utils.get_adapter_params(model))
    return model


def test_torchtune_lora_layers_are_captured_and_a_recipe_loop_steps_as_one_batch():
    """torchtune's recipes sum the token losses of the micro-batches, then divide the gradients by
    the token count (``training.scale_grads``) and clip: the step equals one on the mean loss of
    the concatenated batch."""
    training = pytest.importorskip("torchtune.training")
    gen = torch.Generator().manual_seed(2)
    micro = [torch.randint(0, 40, (2, 9), generator=gen) for _ in range(2)]

    def token_loss(model, ids, reduction):
        logits = model(ids)[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1), reduction=reduction)

    model = torchtune_model()
    opt = oplora.OPLoRA(model, lr=0.1, seed=0)
    assert len(opt.lora_layers) == 4 and "q_proj x2, v_proj x2" in repr(opt)
    start = factors(model)
    for _ in range(2):
        opt.zero_grad()
        tokens = 0
        for ids in micro:
            token_loss(model, ids, "sum").backward()
            tokens += ids[:, 1:].numel()
        training.scale_grads(model, torch.tensor(1.0 / tokens))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e3)
        opt.step()

    plain = torchtune_model()
    plain_opt = oplora.OPLoRA(plain, lr=0.1, seed=0)
    for _ in range(2):
        plain_opt.zero_grad()
        token_loss(plain, torch.cat(micro), "mean").backward()
        plain_opt.step()
    assert moved(factors(model), start)
    assert_same(factors(model), factors(plain))


def test_torchtune_disabled_adapters_are_not_captured():
    """torchtune's DPO recipe: the reference forward runs with the adapters disabled (grad on
    here, to be strict), then the policy forward; only the policy's pass is captured."""
    peft_utils = pytest.importorskip("torchtune.modules.peft")
    model = torchtune_model()
    opt = oplora.OPLoRA(model, lr=0.1, seed=0)
    ids = torch.randint(0, 40, (2, 9))
    with peft_utils.disable_adapter(model):
        reference = model(ids)
    assert not reference.requires_grad and opt.capture_bytes() == 0
    (model(ids) - reference).square().mean().backward()
    assert all(site.passes == 1 and site.rows == ids.numel() for site in opt._sites)
    opt.step()


def test_torchtune_dora_layers_are_refused_by_name():
    model = torchtune_model(use_dora=True)
    with pytest.raises(ValueError, match="every LoRA layer .* torchtune DoRALinear"):
        oplora.OPLoRA(model)
