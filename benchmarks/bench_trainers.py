"""KlestGRPOTrainer's step time against TRL 1.16.0's own GRPOTrainer, and reference forwards.

A small Qwen2 causal LM built from a config (no downloads) is trained for a few GRPO steps on CPU
by each trainer, interleaved round by round (TRL, then each klest variant, then TRL again, ...);
the step time is TRL's own ``step_time`` metric (generation, reference log-probs, forward and
backward, optimizer step), the first step of each run dropped as warm-up. Printed: the median over
rounds of each run's median step, and the ratio to TRL's (target ≤ 1.05 for the same KL, k3).

Variants: ``trl@1.16.0:grpo`` (TRL's own KL through the adapter: the adapter's overhead alone),
klest's default (k3 value, reverse-KL gradient: the same KL value), ``full_kl`` and
``sequence_kl`` (full-vocabulary: one extra reference forward per generation batch). Reference and
policy backbone forwards per step are counted with forward hooks.

Run: ``.venv/bin/python benchmarks/bench_trainers.py`` (``--help`` for sizes and repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import add_write_docs_flag, markdown_table, write_block  # noqa: E402
from _platform import describe  # noqa: E402

try:
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
except ImportError:  # pragma: no cover
    sys.exit("bench_trainers needs TRL: pip install 'klest[trl]'")

from klest.integrations.trl import KlestGRPOTrainer  # noqa: E402

VARIANTS: dict[str, object] = {
    "klest kl='trl@1.16.0:grpo'": "trl@1.16.0:grpo",
    "klest default (k3, reverse-KL)": None,
    "klest kl='full_kl'": "full_kl",
    "klest kl='sequence_kl'": "sequence_kl",
}


def build(folder: str, vocab_size: int, hidden: int, layers: int) -> object:
    words = [f"w{i}" for i in range(vocab_size - 3)]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    cfg = transformers.Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return tok


def make(cls: type, folder: str, tok: object, a: argparse.Namespace, **kw: object) -> object:
    words = [f"w{i}" for i in range(40)]
    ds = Dataset.from_dict({"prompt": [" ".join(words[i : i + 4]) for i in range(32)]})
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=a.batch,
        num_generations=4,
        max_completion_length=a.completion,
        max_steps=a.steps,
        learning_rate=1e-3,
        beta=0.05,
        use_bias_correction_kl=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    tr: Any = cls(
        model=folder,
        reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
        args=args,
        train_dataset=ds,
        processing_class=tok,
        **kw,
    )
    tr.remove_callback(transformers.PrinterCallback)
    tr.remove_callback(transformers.trainer_callback.ProgressCallback)
    return tr


def run(
    cls: type, folder: str, tok: object, a: argparse.Namespace, **kw: object
) -> tuple[list[float], list[float], float, float]:
    """(wall and CPU seconds of each step after the first, reference and policy backbone
    forwards per step)."""
    tr: Any = make(cls, folder, tok, a, **kw)
    cpu: list[float] = []

    class StepClock(transformers.TrainerCallback):  # CPU seconds of this process per step
        def on_step_begin(self, *args: object, **kwargs: object) -> None:
            self.t0 = time.process_time()

        def on_step_end(self, *args: object, **kwargs: object) -> None:
            cpu.append(time.process_time() - self.t0)

    tr.add_callback(StepClock())
    counts = {"ref": 0, "policy": 0}

    def counter(key: str):  # type: ignore[no-untyped-def]
        def hook(*_: object) -> None:
            counts[key] += 1

        return hook

    tr.ref_model.base_model.register_forward_hook(counter("ref"))
    tr.model.base_model.register_forward_hook(counter("policy"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    wall = [h["step_time"] for h in tr.state.log_history if "step_time" in h]
    return wall[1:], cpu[1:], counts["ref"] / a.steps, counts["policy"] / a.steps


def loss_only(folder: str, tok: object, a: argparse.Namespace) -> dict[str, float]:
    """CPU seconds of loss + backward on one shared generation batch, every trainer in turn
    (interleaved), median over ``a.loss_repeats``; plus the adapter's reference forward."""
    trainers: dict[str, Any] = {"TRL GRPOTrainer": make(trl.GRPOTrainer, folder, tok, a)}
    for name, kl in VARIANTS.items():
        trainers[name] = make(KlestGRPOTrainer, folder, tok, a, kl=kl)
    gen = trainers["klest kl='full_kl'"]
    rows = [gen.train_dataset[i] for i in range(a.batch)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = gen._generate_and_score_completions(rows)  # holds the reference's hidden states
    times: dict[str, list[float]] = {n: [] for n in trainers}
    ref_fwd: list[float] = []
    for tr in trainers.values():
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1
    for _ in range(a.loss_repeats):
        for name, tr in trainers.items():
            tr.model.zero_grad(set_to_none=True)
            t0 = time.process_time()
            tr._compute_loss(tr.model, batch).backward()
            times[name].append(time.process_time() - t0)
        t0 = time.process_time()
        gen._klest_reference_hidden(batch)
        ref_fwd.append(time.process_time() - t0)
    out = {n: statistics.median(t) for n, t in times.items()}
    out["reference forward (full_kl, sequence_kl)"] = statistics.median(ref_fwd)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--loss-repeats", type=int, default=40)
    add_write_docs_flag(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    print(describe())
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), trl {trl.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"model: Qwen2 hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}; batch {a.batch} "
        f"completions of <= {a.completion} tokens; {a.steps} steps x {a.rounds} rounds"
    )
    folder = tempfile.mkdtemp()
    tok = build(folder, a.vocab, a.hidden, a.layers)
    names = ["TRL GRPOTrainer", *VARIANTS]
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    forwards: dict[str, tuple[float, float]] = {}
    for _ in range(a.rounds):
        for name in names:
            if name == "TRL GRPOTrainer":
                w, c, ref, pol = run(trl.GRPOTrainer, folder, tok, a)
            else:
                w, c, ref, pol = run(KlestGRPOTrainer, folder, tok, a, kl=VARIANTS[name])
            wall[name].append(statistics.median(w))
            cpu[name].append(statistics.median(c))
            forwards[name] = (ref, pol)
    base_w = statistics.median(wall["TRL GRPOTrainer"])
    base_c = statistics.median(cpu["TRL GRPOTrainer"])
    head = ("trainer", "wall ms", "/ TRL", "CPU ms", "/ TRL", "ref fwd", "policy fwd")
    print("\nmedians over rounds of each run's median step; forwards per step")
    print(f"{head[0]:40s} {head[1]:>9s} {head[2]:>6s} {head[3]:>9s} {head[4]:>6s} ", end="")
    print(f"{head[5]:>8s} {head[6]:>11s}")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        ref, pol = forwards[name]
        print(
            f"{name:40s} {1e3 * w:9.1f} {w / base_w:6.3f} {1e3 * c:9.1f} {c / base_c:6.3f} ", end=""
        )
        print(f"{ref:8.1f} {pol:11.1f}")
    loss = loss_only(folder, tok, a)
    base_l = loss["TRL GRPOTrainer"]
    print(
        f"\nloss + backward on one shared batch (CPU ms, median of {a.loss_repeats} interleaved "
        "repeats); the difference to TRL's, as a fraction of TRL's median step"
    )
    for name, t in loss.items():
        extra = t if name.startswith("reference") else t - base_l
        print(f"{name:44s} {1e3 * t:8.2f}   extra {1e3 * extra:+7.2f} = {extra / base_c:+.3f} step")
    if a.write_docs:
        fwd = loss["reference forward (full_kl, sequence_kl)"]
        rows = []
        for name in names:
            t = loss[name]
            ref, _ = forwards[name]
            extra = t - base_l + (fwd if ref > forwards["TRL GRPOTrainer"][0] else 0.0)
            rows.append(
                [
                    name,
                    f"{1e3 * statistics.median(cpu[name]):.0f} ms "
                    f"({statistics.median(cpu[name]) / base_c:.2f}×)",
                    f"{1e3 * t:.2f} ms",
                    "—" if name == "TRL GRPOTrainer" else f"{1e3 * extra:+.2f} ms",
                    "—" if name == "TRL GRPOTrainer" else f"{1 + extra / base_c:.3f}×",
                    f"{ref:.0f}",
                ]
            )
        header = [
            "trainer",
            "whole step, CPU (vs TRL)",
            "loss + backward",
            "added per step",
            "TRL's step + added",
            "reference forwards / step",
        ]
        intro = (
            f"Qwen2 with hidden size {a.hidden}, {a.layers} layers, vocabulary {a.vocab}; "
            f"{a.batch} completions of {a.completion} tokens per step; {a.rounds} rounds of "
            f"{a.steps} steps (whole steps: median CPU time, first step of each run dropped); "
            f"loss + backward on one shared batch, {a.loss_repeats} interleaved repeats, median "
            "CPU time; the added cost includes the extra reference forward "
            f"({1e3 * fwd:.2f} ms) for the full-vocabulary options. TRL {trl.__version__}, "
            f"transformers {transformers.__version__}.\n\n"
        )
        write_block("trainers", intro + markdown_table(header, rows) + "\n")


if __name__ == "__main__":
    main()
