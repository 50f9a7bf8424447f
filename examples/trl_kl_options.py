"""Each KL option in a real TRL GRPO run, at the same β: what happens to the sequence KL?

A tiny Qwen2 causal LM (about 300k parameters) is built from a config with a local WordLevel
tokenizer (no downloads) and saved: it is the reference π_ref. The policy starts from it and is
trained by ``klest.integrations.trl.KlestGRPOTrainer`` (TRL 1.16.0's GRPOTrainer, loss_type
"dapo", β = 1 by default) on a toy task: the reward of a completion is the fraction of its
tokens that lie in a fixed set of 8 "good" words (out of 45); about 0.17 under π_ref.

KL options, same β, same seeds:

- ``trl@1.16.0:grpo``: TRL's own term, k3 as a loss (its gradient follows the forward KL);
- klest's default: k3 value, reverse-KL gradient (per token);
- ``sequence_kl:k1``: k1 with reward-to-go (what k1 in the reward gives with γ = 1 returns);
- ``sequence_kl``: the Rao-Blackwellised sequence KL (full-vocabulary KL_t plus its score term).

Measured every few steps, on 128 fresh completions of the current policy (the global generator is
saved and restored around the measurement, so measuring does not change training): the exact
sequence-level KL(π‖π_ref) = E_π[Σ_t KL_t], estimated by Σ_t full_kl summed along each sampled
sequence (Rao-Blackwellised: each KL_t is exact over the vocabulary), its standard error over
sequences, and the mean reward.

Run: ``.venv/bin/python examples/trl_kl_options.py`` (about 3 minutes on a busy 2-core
machine); it writes docs/trainers_run.png and the results section of docs/trainers.md.
``--quick`` runs one seed for a few steps (a smoke test).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import tempfile
import time
import warnings
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from klest.integrations.trl import KlestGRPOTrainer  # noqa: E402
from klest.logits import full_kl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(45)]
GOOD = set(WORDS[:8])
OPTIONS: dict[str, object] = {
    "TRL k3 loss (trl@1.16.0:grpo)": "trl@1.16.0:grpo",
    "klest default (k3, reverse-KL grad)": None,
    "k1 reward-to-go (sequence_kl:k1)": "sequence_kl:k1",
    "sequence KL (sequence_kl)": "sequence_kl",
}
COMPLETION = 8


def build(folder: str) -> transformers.PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    cfg = transformers.Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(1234)
    model = transformers.Qwen2ForCausalLM(cfg)
    torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def reward(completions: list[str], **kwargs: object) -> list[float]:
    out = []
    for c in completions:
        toks = c.split()
        out.append(sum(t in GOOD for t in toks) / max(len(toks), 1))
    return out


class Meter(transformers.TrainerCallback):
    """Every ``every`` steps: exact sequence KL(π‖π_ref) (Σ_t full KL_t along fresh samples of π)
    with its standard error, and the mean reward, on ``n`` completions."""

    def __init__(self, ref: torch.nn.Module, tok: object, every: int, n: int, seed: int) -> None:
        self.ref, self.tok, self.every, self.n, self.seed = ref, tok, every, n, seed
        self.rows: list[tuple[int, float, float, float]] = []

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, step: int) -> None:
        state = torch.random.get_rng_state()  # measuring must not change the training run
        torch.manual_seed(10_000 * self.seed + step)
        g = torch.Generator().manual_seed(step)
        starts = torch.randint(0, len(WORDS) - 3, (self.n,), generator=g)
        prompts = [" ".join(WORDS[int(s) : int(s) + 3]) for s in starts]
        enc = self.tok(prompts, return_tensors="pt")
        was_training = model.training
        model.eval()
        seqs = model.generate(
            **enc,
            do_sample=True,
            max_new_tokens=COMPLETION,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            pad_token_id=0,
        )
        torch.random.set_rng_state(state)
        p = enc["input_ids"].size(1)
        comp = seqs[:, p:]
        # valid completion tokens: up to and including the first <eos>
        is_eos = comp == 1
        after = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
        mask = after == 0
        attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)
        k = comp.size(1)
        lp = model(input_ids=seqs, attention_mask=attn).logits[:, p - 1 : p - 1 + k]
        lr = self.ref(input_ids=seqs, attention_mask=attn).logits[:, p - 1 : p - 1 + k]
        kl_t = full_kl(lp.double(), lr.double(), mask)
        seq = kl_t.sum(-1)
        texts = self.tok.batch_decode(comp.masked_fill(~mask, 0), skip_special_tokens=True)
        r = torch.tensor(reward(texts), dtype=torch.float64)
        se = float(seq.std()) / math.sqrt(seq.numel())
        self.rows.append((step, float(seq.mean()), se, float(r.mean())))
        model.train(was_training)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step % self.every == 0:
            self.measure(model, state.global_step)


def train(folder: str, tok: object, kl: object, seed: int, a: argparse.Namespace) -> Meter:
    ds = Dataset.from_dict(
        {"prompt": [" ".join(WORDS[i : i + 3]) for i in range(len(WORDS) - 3)] * 4}
    )
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=COMPLETION,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        beta=a.beta,
        use_bias_correction_kl=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=a.steps,
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
    )
    tr = KlestGRPOTrainer(
        model=folder, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok, kl=kl
    )
    tr.remove_callback(transformers.PrinterCallback)
    ref = transformers.Qwen2ForCausalLM.from_pretrained(folder).eval()
    meter = Meter(ref, tok, a.every, a.samples, seed)
    meter.measure(tr.model, 0)
    tr.add_callback(meter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    return meter


def write_docs(results: dict[str, list[Meter]], a: argparse.Namespace, wall: float) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    lines = [
        "| KL option | sequence KL(π‖π_ref) at the end | reward at the end | reward gain | "
        "gain / KL |",
        "|---|---|---|---|---|",
    ]
    for name, meters in results.items():
        steps = [r[0] for r in meters[0].rows]
        kl = [statistics.mean(m.rows[i][1] for m in meters) for i in range(len(steps))]
        rw = [statistics.mean(m.rows[i][3] for m in meters) for i in range(len(steps))]
        axes[0].plot(steps, kl, marker="o", ms=3, label=name)
        axes[1].plot(steps, rw, marker="o", ms=3, label=name)
        ends = [m.rows[-1] for m in meters]
        kls = [e[1] for e in ends]
        n = len(kls)
        # spread over seeds (the seed-to-seed variation); the per-run stderr is far smaller
        kl_se = statistics.stdev(kls) / math.sqrt(n) if n > 1 else ends[0][2]
        rws = [e[3] for e in ends]
        rw_se = statistics.stdev(rws) / math.sqrt(n) if n > 1 else float("nan")
        gains = [m.rows[-1][3] - m.rows[0][3] for m in meters]  # from the same run's start
        ratio = statistics.mean(gains) / statistics.mean(kls)
        lines.append(
            f"| {name} | {statistics.mean(kls):.3f} ± {kl_se:.3f} | "
            f"{statistics.mean(rws):.3f} ± {rw_se:.3f} | {statistics.mean(gains):.3f} | "
            f"{ratio:.3f} |"
        )
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("sequence KL(π‖π_ref), nats")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("mean reward")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"TRL GRPO, β = {a.beta}, mean of {len(a.seeds)} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "trainers_run.png", dpi=110)
    per_run = max(m.rows[-1][2] for ms in results.values() for m in ms)
    text = "\n".join(
        [
            f"Seeds {', '.join(map(str, a.seeds))}; {a.steps} steps of 16 completions "
            f"(2 prompts × 8), lr {a.lr}, β = {a.beta}; measured every {a.every} steps on "
            f"{a.samples} fresh completions. Mean over seeds ± the standard error over seeds "
            f"(within one run the KL's standard error is at most {per_run:.3f}). "
            f"Run time {wall / 60:.1f} min "
            "(`.venv/bin/python examples/trl_kl_options.py`).",
            "",
            *lines,
            "",
            "![sequence KL and reward along training](trainers_run.png)",
        ]
    )
    page = ROOT / "docs" / "trainers.md"
    doc = page.read_text()
    doc = re.sub(
        r"(<!-- run:begin -->\n).*?(\n<!-- run:end -->)",
        lambda m: m.group(1) + text + m.group(2),
        doc,
        flags=re.S,
    )
    page.write_text(doc)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--no-docs", action="store_true", help="print only")
    p.add_argument("--quick", action="store_true", help="one seed, 4 steps, no docs")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.steps, a.every, a.samples = [0], 4, 2, 32
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp()
    tok = build(folder)
    t0 = time.time()
    results: dict[str, list[Meter]] = {name: [] for name in OPTIONS}
    for seed in a.seeds:
        for name, kl in OPTIONS.items():
            meter = train(folder, tok, kl, seed, a)
            results[name].append(meter)
            print(
                f"seed {seed} {name:38s} " + " ".join(f"{r[1]:.3f}/{r[3]:.2f}" for r in meter.rows)
            )
    wall = time.time() - t0
    if not (a.quick or a.no_docs):
        write_docs(results, a, wall)
    print(f"{wall:.0f} s")


if __name__ == "__main__":
    main()
