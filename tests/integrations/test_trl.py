"""klest.integrations.trl.KlestGRPOTrainer inside a real TRL 1.16.0 GRPOTrainer.

A tiny Qwen2 causal LM (a few thousand parameters) built from a config and a WordLevel tokenizer,
saved to a temporary folder (no downloads). The policy is the saved model perturbed by a seeded
generator, so that π ≠ π_ref at the first step (TRL loads the reference from the folder).

Every expected number is computed here independently of the adapter: TRL's own trainer, or
float64 log-softmaxes of the two models' full logits.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import warnings

import pytest

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HAVE_TRL = all(
    importlib.util.find_spec(m) is not None
    for m in ("torch", "trl", "datasets", "tokenizers", "transformers")
)
needs_trl = pytest.mark.skipif(not HAVE_TRL, reason="needs TRL: pip install 'klest[trl]'")
# TRL's own configuration deprecation notices (gradient_checkpointing) are not ours
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

if HAVE_TRL:
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    import klest.rl
    from klest import KlestError
    from klest.integrations.trl import KlestGRPOTrainer, parse_kl
    from klest.rl import KLController

    GRPOConfig, GRPOTrainer = trl.GRPOConfig, trl.GRPOTrainer
BETA = 0.1
WORDS = [f"w{i}" for i in range(29)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, tokenizer): the reference model and its tokenizer, saved locally."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    cfg = transformers.Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    folder = tmp_path_factory.mktemp("tiny_lm")
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    torch.random.set_rng_state(state)
    tok.save_pretrained(folder)
    return str(folder), tok


def _policy(folder):
    """The saved model, perturbed by a seeded generator (not the global one)."""
    model = transformers.Qwen2ForCausalLM.from_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _capturing(cls):
    class Capturing(cls):
        def _compute_loss(self, model, inputs):
            self.captured.append(
                {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
            )
            return super()._compute_loss(model, inputs)

    return Capturing


def _train(tiny, tmp_path, cls=None, *, steps=2, sgd=False, beta=BETA, **kw):
    cls = cls or GRPOTrainer
    folder, tok = tiny
    args = GRPOConfig(
        output_dir=str(tmp_path / f"out_{cls.__name__}"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=steps,
        learning_rate=1.0 if sgd else 1e-2,
        optim="sgd" if sgd else "adamw_torch",
        lr_scheduler_type="constant",
        max_grad_norm=0.0 if sgd else 1.0,
        beta=beta,
        use_bias_correction_kl=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    ds = datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[i : i + 3]) for i in range(16)]})
    tr = _capturing(cls)(
        model=_policy(folder),
        reward_funcs=_reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        **kw,
    )
    tr.captured = []
    tr.ref_calls = 0
    if tr.ref_model is not None:

        def count(*_):
            tr.ref_calls += 1

        tr.ref_model.base_model.register_forward_hook(count)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train()
    tr.rng_after = torch.random.get_rng_state()
    return tr


def _logs(tr, key):
    return [h[key] for h in tr.state.log_history if key in h]


def _full_logprobs(model, batch):
    """float64 log-softmax of the logits that predict each completion token [B, K, V]."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    k = batch["completion_ids"].size(1)
    with torch.no_grad():
        logits = model.double()(input_ids=ids, attention_mask=attn).logits
    return torch.log_softmax(logits[:, -k - 1 : -1].double(), dim=-1)


@pytest.fixture(scope="module")
def trl_run(tiny, tmp_path_factory):
    return _train(tiny, tmp_path_factory.mktemp("trl"))


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    return _train(tiny, tmp_path_factory.mktemp("full"), KlestGRPOTrainer, kl="full_kl")


# ------------------------------------------------------------------------------------ imports
def test_import_klest_and_integrations_do_not_import_trl():
    code = (
        "import sys, klest, klest.integrations\n"
        "bad = [m for m in ('trl', 'transformers', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------- parsing
@needs_trl
def test_parse_kl():
    assert parse_kl(None).options == {"estimator": "k3", "gradient": "reverse_kl"}
    assert parse_kl("trl@1.16.0:grpo").preset.name == "trl@1.16.0:grpo"
    assert parse_kl("trl:grpo:bias_correction").bias_correction
    assert parse_kl("full_kl").needs_reference_hidden
    assert parse_kl("sequence_kl").sequence_estimator == "full"
    assert not parse_kl("sequence_kl:k1").needs_reference_hidden
    for bad in ("no_such_preset", "sequence_kl:k3", 3, {"estimator": "k3", "aggregation": "x"}):
        with pytest.raises(KlestError) as info:
            parse_kl(bad)
        assert info.value.argument == "kl"
    with pytest.raises(KlestError, match="kl"):
        parse_kl({"gradient": "reverse_kl", "weight": "differentiable"})


@needs_trl
def test_liger_is_refused_before_anything(tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", use_liger_kernel=True, beta=0.1
    )
    with pytest.raises(KlestError, match="Liger") as info:
        KlestGRPOTrainer(model="/nonexistent", reward_funcs=_reward, args=args)
    assert info.value.argument == "args" and "\n" not in str(info.value)


@needs_trl
def test_bias_correction_warns_once_unless_the_preset_is_asked_for(tiny, tmp_path):
    folder, tok = tiny
    ds = datasets.Dataset.from_dict({"prompt": ["w1 w2"] * 4})

    def make(**kw):
        args = GRPOConfig(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to="none",
            beta=0.1,
            per_device_train_batch_size=4,
            num_generations=4,
        )
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            KlestGRPOTrainer(
                model=folder,
                reward_funcs=_reward,
                args=args,
                train_dataset=ds,
                processing_class=tok,
                **kw,
            )
        return [w for w in rec if "use_bias_correction_kl" in str(w.message)]

    assert len(make()) == 1
    assert make(kl="trl@1.16.0:grpo:bias_correction") == []


@needs_trl
def test_kl_target_needs_beta(tiny, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", beta=0.0)
    with pytest.raises(KlestError) as info:
        KlestGRPOTrainer(model=tiny[0], reward_funcs=_reward, args=args, kl_target=0.1)
    assert info.value.argument == "kl_target"


# ------------------------------------------------------------------------------- exactness
@needs_trl
def test_trl_preset_reproduces_grpo_trainer(tiny, tmp_path, trl_run):
    ours = _train(tiny, tmp_path, KlestGRPOTrainer, kl="trl@1.16.0:grpo")
    assert len(_logs(ours, "loss")) == 2
    for a, b in zip(_logs(trl_run, "loss"), _logs(ours, "loss"), strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    for a, b in zip(_logs(trl_run, "kl"), _logs(ours, "kl"), strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for (name, p), q in zip(trl_run.model.named_parameters(), ours.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    # the same random numbers were drawn (same completions, same generator state after)
    for x, y in zip(trl_run.captured, ours.captured, strict=True):
        assert torch.equal(x["completion_ids"], y["completion_ids"])
    assert torch.equal(trl_run.rng_after, ours.rng_after)


@needs_trl
def test_default_differs_by_the_predicted_gradient(tiny, tmp_path):
    """One SGD step (lr = 1, no clipping): θ_trl - θ_klest = g_klest - g_trl. Per token, the
    derivative of klest's default term w.r.t. logp is ℓ (reverse KL), TRL's k3-as-loss gives
    1 - e^{-ℓ}; their difference is ℓ - 1 + e^{-ℓ} = k3(ℓ). So the predicted difference is
    β ∇_θ Σ_bt m_bt sg(k3_bt) logp_bt / N (dapo: N = valid tokens), computed here in float64
    from the two models' own logits."""
    theirs = _train(tiny, tmp_path, GRPOTrainer, steps=1, sgd=True)
    ours = _train(tiny, tmp_path, KlestGRPOTrainer, steps=1, sgd=True)
    batch = ours.captured[0]
    assert torch.equal(batch["completion_ids"], theirs.captured[0]["completion_ids"])
    folder, _ = tiny
    ref_lp = _full_logprobs(transformers.Qwen2ForCausalLM.from_pretrained(folder), batch)
    policy = _policy(folder).double()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    k = batch["completion_ids"].size(1)
    lp_all = torch.log_softmax(
        policy(input_ids=ids, attention_mask=attn).logits[:, -k - 1 : -1], -1
    )
    tokens = batch["completion_ids"].unsqueeze(-1)
    logp = lp_all.gather(-1, tokens).squeeze(-1)
    ref = ref_lp.gather(-1, tokens).squeeze(-1)
    m = batch["completion_mask"].double()
    ell = (logp - ref).detach()
    k3 = torch.expm1(-ell) + ell
    surrogate = BETA * (m * k3 * logp).sum() / m.sum()
    predicted = torch.autograd.grad(surrogate, list(policy.parameters()))
    num = den = 0.0
    for p_t, p_k, d in zip(
        theirs.model.parameters(), ours.model.parameters(), predicted, strict=True
    ):
        diff = (p_t.detach().double() - p_k.detach().double()) - d
        num += float((diff * diff).sum())
        den += float((d * d).sum())
    assert den > 1e-6  # the prediction is not trivially zero
    assert math.sqrt(num / den) < 1e-4


# ------------------------------------------------------------------------ full-vocabulary KL
@needs_trl
def test_full_kl_value_and_reference_forwards(tiny, trl_run, full_run):
    ours = full_run
    # one reference forward per generation batch, on top of TRL's own
    assert ours.klest_reference_forwards == 2
    assert ours.ref_calls == trl_run.ref_calls + 2
    # the first step's logged kl: the exact per-position KL, masked mean, from float64 logits
    folder, _ = tiny
    batch = ours.captured[0]
    lp = _full_logprobs(_policy(folder), batch)
    ref = _full_logprobs(transformers.Qwen2ForCausalLM.from_pretrained(folder), batch)
    kl_t = (lp.exp() * (lp - ref)).sum(-1)
    m = batch["completion_mask"].double()
    exact = float((kl_t * m).sum() / m.sum())
    assert _logs(ours, "kl")[0] == pytest.approx(exact, rel=2e-5)
    # standard error over sequences (ratio estimator), from the same float64 values
    s, n = (kl_t * m).sum(-1), m.sum(-1)
    b = s.numel()
    se = math.sqrt(b / (b - 1) * float(((s - exact * n) ** 2).sum())) / float(n.sum())
    assert _logs(ours, "kl_stderr")[0] == pytest.approx(se, rel=1e-4)
    # TRL's first step drew the same random numbers: the generations are the same
    assert torch.equal(batch["completion_ids"], trl_run.captured[0]["completion_ids"])


@needs_trl
@pytest.mark.parametrize("kl", ["sequence_kl", "sequence_kl:k1", "sequence_kl:mix"])
def test_sequence_kl_options_train(tiny, tmp_path, trl_run, kl):
    ours = _train(tiny, tmp_path, KlestGRPOTrainer, steps=1, kl=kl)
    loss, value = _logs(ours, "loss")[0], _logs(ours, "kl")[0]
    assert math.isfinite(loss) and math.isfinite(value)
    assert ours.klest_reference_forwards == (0 if kl.endswith("k1") else 1)
    assert torch.equal(ours.captured[0]["completion_ids"], trl_run.captured[0]["completion_ids"])
    assert all(torch.isfinite(p).all() for p in ours.model.parameters())


@needs_trl
def test_loss_draws_nothing_and_logs_the_mismatch(full_run):
    """Re-run the loss on a captured batch, with sampler log-probs added: the global generator
    is untouched, and the mismatch diagnostics are klest.rl.mismatch's of the two log-probs."""
    ours = full_run
    batch = dict(ours.captured[0])
    if not hasattr(klest.rl, "mismatch"):
        pytest.skip("this klest has no klest.rl.mismatch")
    sampled = batch["ref_per_token_logps"]  # any log-probs of the same tokens
    batch["sampling_per_token_logps"] = sampled
    ours._metrics["train"].clear()
    state = torch.random.get_rng_state()
    ours._compute_loss(ours.model, batch)
    assert torch.equal(torch.random.get_rng_state(), state)
    logged = ours._metrics["train"]
    logp = ours._klest_logps.detach()
    want = klest.rl.mismatch(logp, sampled, batch["completion_mask"]).as_dict("mismatch/")
    assert want and set(want) <= set(logged)
    for key, value in want.items():
        assert logged[key] == [pytest.approx(value, rel=1e-12, nan_ok=True)], key


@needs_trl
def test_kl_target_drives_beta_with_the_controller(tiny, tmp_path):
    ctrl = KLController("adaptive", init=BETA, target=0.05, horizon=100)
    ours = _train(tiny, tmp_path, KlestGRPOTrainer, kl_target=ctrl)
    replay = KLController("adaptive", init=BETA, target=0.05, horizon=100)
    logged = zip(_logs(ours, "kl"), _logs(ours, "kl_stderr"), _logs(ours, "beta"), strict=True)
    for kl, se, beta in logged:
        replay.update(kl, kl_stderr=se, n_steps=4)  # 4 sequences per optimizer step
        assert beta == pytest.approx(replay.value, rel=1e-12)
    assert ours.beta == pytest.approx(replay.value, rel=1e-12) and ours.beta != BETA
