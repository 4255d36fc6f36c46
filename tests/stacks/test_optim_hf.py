"""The optimizers inside the Hugging Face Trainer on a PEFT model (tiny BERT built from a config,
nothing downloaded): ``Trainer(optimizers=(opt, scheduler))`` trains the LoRA factors and the
``modules_to_save`` head, with gradient accumulation and a transformers LR schedule."""

import os

import pytest
import torch

import oplora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


class Pairs(torch.utils.data.Dataset):
    """Label = whether token 7 appears in the sequence."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(8, 50, (12,), generator=torch.Generator().manual_seed(i))
        if i % 2:
            ids[i % 12] = 7
        return {"input_ids": ids, "labels": torch.tensor(i % 2)}


@pytest.mark.parametrize("name", ["oplora", "scaled"])
def test_trainer_runs_the_optimizer_and_its_scheduler(tmp_path, name):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       modules_to_save=["classifier"]))
    if name == "oplora":
        opt = oplora.OPLoRA(model, lr=0.05, other_kwargs={"lr": 1e-3})
    else:
        opt = oplora.ScaledOPLoRA(model, lr=0.01, other_kwargs={"lr": 1e-3})
    assert len(opt.lora_layers) == 4
    sched = transformers.get_linear_schedule_with_warmup(opt, 1, 6)
    lora_b = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    before = lora_b.detach().clone(), head.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=Pairs(), optimizers=(opt, sched)).train()
    assert opt.state[lora_b]["step"] == 6
    assert not torch.equal(lora_b, before[0]) and not torch.equal(head, before[1])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ran to its end
    assert all(not site.rows for site in opt._sites)
