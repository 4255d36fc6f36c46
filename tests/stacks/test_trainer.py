"""The optimizers through the Hugging Face ``Trainer`` on a tiny PEFT BERT built from a config
(nothing downloaded): ``oplora.create_optimizer``, training that lowers the loss, gradient
accumulation that equals one step on the doubled batch, and checkpoint save/resume that
reproduces the uninterrupted run (factors, head, momentum, K-FAC statistics, schedule).

What the Trainer does between micro-batches (transformers 5): each micro-batch's loss is divided
by ``gradient_accumulation_steps`` and back-propagated (the optimizer captures X and sD of each);
after the last one it clips ``.grad`` (``max_grad_norm``: one coefficient for every gradient,
which the optimizer applies to what it captured; disabled in most tests here, tested on its own),
then ``optimizer.step()``, ``lr_scheduler.step()`` and ``model.zero_grad()``.
"""

import csv
import os
import sys
import warnings

import pytest
import torch

import oplora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, LENGTH = 40, 12


class Pairs(torch.utils.data.Dataset):
    """Label 1 when the sequence starts with token 7 (0 otherwise); fixed per index."""

    def __init__(self, size: int, offset: int = 0):
        self.size, self.offset = size, offset

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        j = i + self.offset
        ids = torch.randint(8, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(j))
        if j % 2:
            ids[0] = 7
        return {"input_ids": ids, "labels": torch.tensor(j % 2)}


def tiny_peft_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, initializer_range=0.2)
    model = transformers.BertForSequenceClassification(cfg)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))


class Text(torch.utils.data.Dataset):
    """Fixed random token sequences for a causal LM (labels = inputs; the model shifts them)."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def tiny_peft_llama(seed: int = 0, targets=("q_proj", "v_proj")):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=LENGTH)
    model = transformers.LlamaForCausalLM(cfg)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=list(targets)))


def make_optimizer(model, name):
    if name == "oplora":
        return oplora.create_optimizer(model, "oplora", lr=0.1, momentum=0.9, seed=0, other_kwargs={"lr": 1e-2})
    return oplora.create_optimizer(model, "scaled", lr=0.02, seed=0, other_kwargs={"lr": 1e-2})


def args_for(out, **kw):
    base = dict(output_dir=str(out), report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
                max_grad_norm=0.0, save_strategy="no", logging_strategy="no", dataloader_drop_last=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def trained_tensors(model, opt):
    """Every trainable parameter and every optimizer-state tensor, by name."""
    out = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for i, p in enumerate(opt.param_groups[0]["params"] + opt.param_groups[-1]["params"]):
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[f"state{i}:{key}"] = value.detach().clone()
    return out


def assert_same(got, want, **tol):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m: f"{key}: {m}", **tol)


def test_create_optimizer_by_name():
    model = tiny_peft_bert()
    for name, cls in [("oplora", oplora.OPLoRA), ("scaled", oplora.ScaledOPLoRA), ("svd", oplora.SVDLoRA),
                      ("riemannian", oplora.RiemannianLoRA), ("ScaledOPLoRA", oplora.ScaledOPLoRA)]:
        opt = oplora.create_optimizer(model, name, lr=0.1)
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.1 and len(opt.lora_layers) == 4
        opt.close()
    opt = oplora.create_optimizer(model)
    assert type(opt) is oplora.OPLoRA and opt.param_groups[0]["lr"] == 1e-3
    opt.close()
    with pytest.raises(ValueError, match="unknown optimizer name 'adam'.*'oplora', 'scaled', 'svd', 'riemannian'"):
        oplora.create_optimizer(model, "adam")
    with pytest.raises(ValueError, match="momentum"):
        oplora.create_optimizer(model, "oplora", momentum=1.5)


@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_trainer_training_lowers_the_loss(tmp_path, name):
    model = tiny_peft_bert()
    opt = make_optimizer(model, name)
    steps = 40
    sched = transformers.get_constant_schedule_with_warmup(opt, 2)
    trainer = transformers.Trainer(model=model, args=args_for(tmp_path, max_steps=steps, per_device_train_batch_size=16,
                                                              per_device_eval_batch_size=32),
                                   train_dataset=Pairs(32), eval_dataset=Pairs(32),
                                   optimizers=(opt, sched))
    lora_b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)
    assert lora_b.abs().max() > 0
    assert opt.state[opt.param_groups[0]["params"][1]]["step"] == steps


@pytest.mark.parametrize("model_kind", ["llama", "bert"])
@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_trainer_gradient_accumulation_equals_the_doubled_batch(tmp_path, name, model_kind):
    """gradient_accumulation_steps=2 with batch 8 steps exactly as batch 16 in one pass: the
    optimizer keeps the X and sD of both micro-batches and steps on their concatenation.

    The causal LM divides its summed loss by the Trainer's ``num_items_in_batch`` (the tokens of
    both micro-batches), so each micro-batch's gradient is already its share. BERT's
    classification loss is a mean over its own micro-batch and ignores ``num_items_in_batch``
    while the Trainer assumes it does not need dividing by the accumulation steps (its forward
    takes ``**kwargs``): the recipe sets ``trainer.loss_is_scaled_for_ga = False`` there
    (AdamW would get twice the gradient too).

    The causal LM adapts v_proj and o_proj, not q_proj: a query at position 0 attends to one key,
    so its gradient is zero in exact arithmetic, and whether rounding leaves it exactly zero (then
    it is not a row: SPEC section 3) differs between a batch and its halves. OPLoRA's step does not
    see the difference (the row adds nothing to G); ScaledOPLoRA's statistics count T and
    ``x^2`` over the rows, so such a query moves them by one row in T (seen: 0.5% on a factor)."""
    runs = {}
    for accumulate, batch in [(2, 8), (1, 16)]:
        model = tiny_peft_llama(targets=("v_proj", "o_proj")) if model_kind == "llama" else tiny_peft_bert()
        opt = make_optimizer(model, name)
        args = args_for(tmp_path / f"ga{accumulate}", max_steps=3, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=accumulate)
        data = Text() if model_kind == "llama" else Pairs(64)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
        if model_kind == "bert":
            trainer.loss_is_scaled_for_ga = False
        trainer.train()
        runs[accumulate] = trained_tensors(model, opt)
        assert all(not site.rows for site in opt._sites)
        opt.close()
    lora_b = [k for k in runs[1] if "lora_B" in k]
    assert lora_b and all(runs[1][k].abs().max() > 0 for k in lora_b)  # the factors did move
    # Float32: two chunks are summed in another order than one concatenated batch, and three
    # steps of lr 0.1 carry that rounding into entries of size ~1e-2 (seen: 3e-6 on one of them).
    assert_same(runs[2], runs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_trainer_max_grad_norm_clips_as_the_loss_scaled_by_its_coefficient(tmp_path, name):
    """The Trainer's own clipping (``max_grad_norm``, 1.0 by default) rescales the factors'
    ``.grad`` by one coefficient -- the LoRA factors' and the ``modules_to_save`` head's -- and the
    optimizer applies it to the captured gradient, silently. Each step equals the unclipped
    Trainer's step on the loss scaled by that coefficient (from the ``grad_norm`` the Trainer logs)."""
    max_norm, steps = 0.05, 3
    model = tiny_peft_bert()
    opt = make_optimizer(model, name)
    args = args_for(tmp_path / "clipped", max_steps=steps, per_device_train_batch_size=8, max_grad_norm=max_norm,
                    logging_strategy="steps", logging_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Pairs(64), optimizers=(opt, None))
        trainer.train()
    assert not [w for w in caught if "not used" in str(w.message)]
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    coeffs = [min(1.0, max_norm / (norm + 1e-6)) for norm in norms]
    assert len(coeffs) == steps and max(coeffs) < 1.0  # every step was clipped
    clipped = trained_tensors(model, opt)
    opt.close()

    class ScaledLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, inputs, *args, **kwargs) * coeffs[self.state.global_step]

    twin = tiny_peft_bert()
    twin_opt = make_optimizer(twin, name)
    ScaledLoss(model=twin, args=args_for(tmp_path / "scaled", max_steps=steps, per_device_train_batch_size=8),
               train_dataset=Pairs(64), optimizers=(twin_opt, None)).train()
    assert_same(trained_tensors(twin, twin_opt), clipped, rtol=1e-4, atol=1e-6)
    twin_opt.close()


@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_trainer_resume_from_checkpoint_reproduces_the_run(tmp_path, name):
    steps = 6

    def trainer_for(out, save):
        model = tiny_peft_bert()
        opt = make_optimizer(model, name)
        sched = transformers.get_cosine_schedule_with_warmup(opt, 1, steps)
        kw = dict(save_strategy="steps", save_steps=3) if save else {}
        args = args_for(out, max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2, **kw)
        return transformers.Trainer(model=model, args=args, train_dataset=Pairs(64), optimizers=(opt, sched)), model, opt

    trainer, model, opt = trainer_for(tmp_path / "full", save=True)
    trainer.train()
    want = trained_tensors(model, opt)
    want_lr = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    opt.close()

    trainer, model, opt = trainer_for(tmp_path / "resumed", save=False)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == steps
    assert (opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]) == pytest.approx(want_lr)
    momentum = [k for k in want if k.endswith("momentum_V")]
    assert len(momentum) == 4
    assert_same(trained_tensors(model, opt), want, rtol=1e-6, atol=1e-7)
    opt.close()


def test_trainer_recipe_example_runs(tmp_path):
    """examples/trainer.py --quick: the recipe fine-tunes the digits MLP on digits it never saw
    (accuracy 0 before) through the Trainer with each optimizer."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"))
    import trainer as recipe

    assert recipe.main(["--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "quick" / "trainer.csv") as f:
        rows = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(recipe.RECIPES)
    for row in rows.values():
        assert float(row["test_accuracy"]) > 0.15, row


def test_trainer_optimizer_cls_and_kwargs_with_the_model():
    """``optimizer_cls_and_kwargs=(oplora.OPLoRA, {"model": model, ...})``: the Trainer hands the
    model instead of its parameter groups, and trains as with ``optimizers=(opt, None)``; without
    the model the error names both recipes."""
    kwargs = dict(lr=0.1, momentum=0.9, seed=0, other_kwargs={"lr": 1e-2})
    runs = []
    for how in ("cls_and_kwargs", "optimizers"):
        model = tiny_peft_bert()
        args = args_for(f"/tmp/oplora-trainer-{how}", max_steps=3, per_device_train_batch_size=8,
                        lr_scheduler_type="constant")
        if how == "cls_and_kwargs":
            trainer = transformers.Trainer(model=model, args=args, train_dataset=Pairs(64),
                                           optimizer_cls_and_kwargs=(oplora.OPLoRA, {"model": model, **kwargs}))
        else:
            trainer = transformers.Trainer(model=model, args=args, train_dataset=Pairs(64),
                                           optimizers=(oplora.OPLoRA(model, **kwargs), None))
        trainer.train()
        opt = trainer.optimizer.optimizer  # accelerate's wrapper around it
        assert isinstance(opt, oplora.OPLoRA)
        runs.append(trained_tensors(model, opt))
        opt.close()
    assert_same(runs[0], runs[1], rtol=0, atol=0)
    model = tiny_peft_bert()
    trainer = transformers.Trainer(model=model, args=args_for("/tmp/oplora-trainer-bad", max_steps=1),
                                   train_dataset=Pairs(64), optimizer_cls_and_kwargs=(oplora.OPLoRA, {"lr": 0.1}))
    with pytest.raises(TypeError, match=r"got list.*optimizer_cls_and_kwargs=\(oplora.OPLoRA, \{'model': model"):
        trainer.train()
