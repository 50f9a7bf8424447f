"""klest.integrations.verl against the real verl 0.9.1 wheel, on a CPU.

verl's dependencies conflict with the main test environment's (TRL's transformers), so these tests
run in their own environment, .venv-trainers (``make test-trainers``, part of ``make test``); in
the main environment they skip. Expected values come from closed forms in float64 (k3's value
e^{-ℓ} - 1 + ℓ, the reverse-KL derivative ℓ, the reward-to-go Σ_{s>=t} ℓ_s) and from verl's own
code for verl's own names.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("verl", reason="verl 0.9.1 runs in .venv-trainers (make test-trainers)")

import verl  # noqa: E402
import verl.trainer.distillation.losses as distillation  # noqa: E402
import verl.trainer.ppo.core_algos as core_algos  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig, DistillationLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

import klest.rl  # noqa: E402
from klest import KlestError  # noqa: E402
from klest.integrations import verl as kv  # noqa: E402

BETA = 0.3
VERL_NAMES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


@pytest.fixture(autouse=True)
def _installed():
    kv.install()
    yield
    kv.uninstall()


def _log_probs(seed: int, shape=(4, 6), spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    ref = logp + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    return logp, ref


def _value_and_grad(fn, logp):
    x = logp.detach().clone().requires_grad_()
    out = fn(x)
    out.sum().backward()
    return out.detach(), x.grad


# ------------------------------------------------------------------------- install / uninstall
def test_install_is_idempotent_and_uninstall_restores_verl():
    kv.uninstall()
    original = core_algos.kl_penalty_forward
    getters = (distillation.get_distillation_loss_fn, distillation.get_distillation_loss_settings)
    assert not kv.installed()
    kv.install()
    wrapped = core_algos.kl_penalty_forward
    kv.install()
    assert kv.installed() and core_algos.kl_penalty_forward is wrapped
    assert wrapped.__klest_original__ is original  # wrapped once, not twice
    kv.uninstall()
    assert core_algos.kl_penalty_forward is original
    assert (
        distillation.get_distillation_loss_fn,
        distillation.get_distillation_loss_settings,
    ) == getters
    logp, ref = _log_probs(0)
    with pytest.raises(NotImplementedError):  # verl's own answer to a name it does not know
        core_algos.kl_penalty(logp, ref, "klest:k3")


# ------------------------------------------------------------------- core_algos.kl_penalty
def test_klest_default_is_k3_value_with_the_reverse_kl_gradient():
    logp, ref = _log_probs(1)
    ell = logp - ref
    value, grad = _value_and_grad(lambda x: core_algos.kl_penalty(x, ref, "klest:k3"), logp)
    torch.testing.assert_close(value, torch.expm1(-ell) + ell, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ell, rtol=1e-12, atol=1e-14)


OPTION_NAMES = [
    ("klest:k3", {"estimator": "k3", "gradient": "reverse_kl"}),
    ("klest:k1", {"estimator": "k1", "gradient": "reverse_kl"}),
    ("klest:k2:as_written", {"estimator": "k2", "gradient": "as_written"}),
    ("klest:k3:forward_kl", {"estimator": "k3", "gradient": "forward_kl"}),
    ("klest:forward_k3", {"estimator": "forward_k3", "gradient": "reverse_kl"}),
    ("klest:fdiv:chi2:as_written", {"estimator": "fdiv:chi2", "gradient": "as_written"}),
]
PRESET_NAMES = ["openrlhf@0.11.2:k3", "trl:grpo", "nemo_rl@0.7.0:k3", "verl:k3+"]


@pytest.mark.parametrize("name, options", OPTION_NAMES)
def test_kl_penalty_equals_klest_kl_per_token(name, options):
    logp, ref = _log_probs(2)
    value, grad = _value_and_grad(lambda x: core_algos.kl_penalty(x, ref, name), logp)
    ev, eg = _value_and_grad(lambda x: klest.rl.kl_per_token(x, ref, **options), logp)
    torch.testing.assert_close(value, ev, rtol=0, atol=0)
    torch.testing.assert_close(grad, eg, rtol=0, atol=0)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_kl_penalty_equals_the_klest_preset(preset):
    logp, ref = _log_probs(2)
    value, grad = _value_and_grad(lambda x: core_algos.kl_penalty(x, ref, f"klest:{preset}"), logp)
    ev, eg = _value_and_grad(lambda x: klest.rl.presets.get(preset)(x, ref), logp)
    torch.testing.assert_close(value, ev, rtol=0, atol=0)
    torch.testing.assert_close(grad, eg, rtol=0, atol=0)


def test_kl_penalty_as_a_reward_is_klest_kl_penalty():
    """algorithm.kl_penalty: the reward path calls kl_penalty on detached log-probs."""
    logp, ref = _log_probs(3)
    with torch.no_grad():
        got = core_algos.kl_penalty(logp, ref, "klest:k1")
    torch.testing.assert_close(got, logp - ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(got, klest.rl.kl_penalty(logp, ref), rtol=0, atol=0)


@pytest.mark.parametrize("name", VERL_NAMES)
@pytest.mark.parametrize("plus", ["", "+"])
def test_verl_presets_equal_verl_including_clamps(name, plus):
    """klest:verl@0.9.1:<name> is verl's <name>, clamps included: ℓ spans ±30 so that the
    [-20, 20] input clamp and the [-10, 10] value clamp of low_var_kl both bind."""
    g = torch.Generator().manual_seed(4)
    logp = -torch.rand(8, 16, generator=g, dtype=torch.float64) * 5
    ell = torch.linspace(-30, 30, 128, dtype=torch.float64).reshape(8, 16)
    ref = logp - ell
    mine, my_grad = _value_and_grad(
        lambda x: core_algos.kl_penalty(x, ref, f"klest:verl@0.9.1:{name}{plus}"), logp
    )
    kv.uninstall()
    theirs, their_grad = _value_and_grad(
        lambda x: core_algos.kl_penalty(x, ref, f"{name}{plus}"), logp
    )
    torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(my_grad, their_grad, rtol=1e-13, atol=1e-13)
    if name in ("low_var_kl", "k3") and not plus:  # the clamps did bind somewhere
        assert (their_grad == 0).any() and (theirs == 10).any()


def test_trailing_plus_is_verls_straight_through():
    """klest:X+ : value of klest:X, derivative ℓ (½ℓ²'s), whatever X's own gradient."""
    logp, ref = _log_probs(5)
    ell = logp - ref
    value, grad = _value_and_grad(
        lambda x: core_algos.kl_penalty(x, ref, "klest:k3:forward_kl+"), logp
    )
    torch.testing.assert_close(value, torch.expm1(-ell) + ell, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ell, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "name, words",
    [
        ("klest:nope", "unknown estimator 'nope'"),
        ("klest:verl:nope", "unknown preset"),
        ("klest:verl:full", "full-vocabulary"),
        ("klest:", "names no term"),
        ("klest:k3:sequence_reverse_kl", "couples the tokens of a row"),
        ("klest:trl:grpo:bias_correction:sequence", "couples the tokens of a row"),
    ],
)
def test_bad_klest_names_raise_naming_the_option(name, words):
    logp, ref = _log_probs(6)
    with pytest.raises(KlestError, match="kl_penalty") as err:
        core_algos.kl_penalty(logp, ref, name)
    assert err.value.argument == "kl_penalty"
    assert repr(name) in str(err.value) and words in str(err.value)


def test_verl_names_are_untouched():
    logp, ref = _log_probs(7)
    for name in VERL_NAMES:
        mine = core_algos.kl_penalty(logp, ref, name)
        assert torch.equal(mine, core_algos.kl_penalty_forward.__klest_original__(logp, ref, name))
    with pytest.raises(NotImplementedError):
        core_algos.kl_penalty(logp, ref, "full")


# ------------------------------------------------------------------------------- ppo_loss
PROMPT, RESPONSE = 2, 5
LENGTHS = (5, 2, 4)


def _batch(seed: int, *, kl_loss_type="low_var_kl", agg="token-mean", use_kl_loss=True):
    """A padded verl batch (responses of lengths LENGTHS, right-padded) and the flat model output
    (log-probs of all tokens, shifted by one as a causal LM's), float64."""
    g = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    mask = torch.zeros(b, RESPONSE)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    logp = torch.where(mask.bool(), -torch.rand(b, RESPONSE, generator=g, dtype=torch.float64), 0.0)
    ref = logp + 0.5 * torch.randn(b, RESPONSE, generator=g, dtype=torch.float64)
    ref = torch.where(mask.bool(), ref, 7.0)  # padding: whatever, never read
    old = logp + 0.2 * torch.randn(b, RESPONSE, generator=g, dtype=torch.float64)
    flat = torch.zeros(sum(PROMPT + n for n in LENGTHS), dtype=torch.float64)
    where = []
    offset = 0
    for i, n in enumerate(LENGTHS):
        start = offset + PROMPT - 1
        flat[start : start + n] = logp[i, :n]
        where.append((start, n))
        offset += PROMPT + n
    attention = torch.cat([torch.ones(b, PROMPT), mask], dim=1).long()
    data = TensorDict(
        {
            "prompts": torch.ones(b, PROMPT, dtype=torch.long),
            "responses": torch.ones(b, RESPONSE, dtype=torch.long),
            "attention_mask": attention,
            "response_mask": mask,
            "old_log_probs": old,
            "advantages": torch.randn(b, RESPONSE, generator=g, dtype=torch.float64),
            "ref_log_prob": ref,
        },
        batch_size=[b],
    )
    for key, value in {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}.items():
        tu.assign_non_tensor_data(data, key, value)
    config = ActorConfig(
        strategy="fsdp",
        use_kl_loss=use_kl_loss,
        kl_loss_type=kl_loss_type,
        kl_loss_coef=BETA,
        loss_agg_mode=agg,
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
    )
    return config, flat, data, logp, ref, old, mask, where


def _loss_and_grad(loss_fn, config, flat, data, where):
    x = flat.detach().clone().requires_grad_()
    loss, metrics = loss_fn(config, {"log_probs": x}, data)
    loss.backward()
    grad = torch.zeros(len(where), RESPONSE, dtype=torch.float64)
    for i, (start, n) in enumerate(where):
        grad[i, :n] = x.grad[start : start + n]
    return loss.detach(), grad, metrics


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["klest:k3", "klest:k1:as_written", "klest:k3:forward_kl"])
def test_ppo_loss_kl_term_equals_klest_kl_loss(name, agg):
    config, flat, data, logp, ref, _, mask, where = _batch(8, kl_loss_type=name, agg=agg)
    loss, grad, metrics = _loss_and_grad(ppo_loss, config, flat, data, where)
    base_cfg = _batch(8, use_kl_loss=False, agg=agg)[0]
    base, base_grad, _ = _loss_and_grad(ppo_loss, base_cfg, flat, data, where)
    est, _, gradient = name.removeprefix("klest:").partition(":")
    x = logp.clone().requires_grad_()
    kl = klest.rl.kl_loss(
        x, ref, mask=mask.bool(), estimator=est, gradient=gradient or "reverse_kl", aggregation=agg
    )
    kl.loss.backward()
    torch.testing.assert_close(loss - base, BETA * kl.loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad - base_grad, BETA * x.grad, rtol=1e-10, atol=1e-14)
    assert float(metrics["kl_loss"].values[0]) == pytest.approx(float(kl.loss.detach()), rel=1e-12)


def test_ppo_loss_klest_default_gradient_in_closed_form():
    """token-mean: d(β·KL)/d logp_t = β·ℓ_t/N on valid tokens, 0 on padding."""
    config, flat, data, logp, ref, _, mask, where = _batch(9, kl_loss_type="klest:k3")
    _, grad, _ = _loss_and_grad(ppo_loss, config, flat, data, where)
    _, base_grad, _ = _loss_and_grad(ppo_loss, _batch(9, use_kl_loss=False)[0], flat, data, where)
    expected = BETA * (logp - ref) * mask / mask.sum()
    torch.testing.assert_close(grad - base_grad, expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["low_var_kl", "k1", "mse", "low_var_kl+"])
def test_ppo_loss_verl_preset_equals_verl(name):
    config, flat, data, *_, where = _batch(10, kl_loss_type=f"klest:verl@0.9.1:{name}")
    mine, my_grad, _ = _loss_and_grad(ppo_loss, config, flat, data, where)
    theirs_cfg = _batch(10, kl_loss_type=name)[0]
    theirs, their_grad, _ = _loss_and_grad(ppo_loss, theirs_cfg, flat, data, where)
    torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(my_grad, their_grad, rtol=1e-12, atol=1e-15)


def test_ppo_loss_unknown_klest_name_raises_naming_the_option():
    config, flat, data, *_, where = _batch(11, kl_loss_type="klest:k4")
    with pytest.raises(KlestError, match=r"kl_penalty.*'klest:k4'"):
        _loss_and_grad(ppo_loss, config, flat, data, where)


# --------------------------------------------------------------------------- distillation
def test_distillation_accepts_klest_loss_modes():
    config = DistillationLossConfig(loss_mode="klest:k3")
    assert config.loss_settings.use_estimator
    assert distillation.get_distillation_loss_fn("klest:k3+") is (
        distillation.get_distillation_loss_fn("k3")
    )
    with pytest.raises(KlestError, match="loss_mode"):
        DistillationLossConfig(loss_mode="klest:k4")
    kv.uninstall()
    with pytest.raises(ValueError, match="Unsupported loss mode"):
        DistillationLossConfig(loss_mode="klest:k3")


# -------------------------------------------------------------------------- klest_ppo_loss
def test_klest_ppo_loss_with_a_verl_preset_is_ppo_loss():
    config, flat, data, *_, where = _batch(12)
    loss_fn = functools.partial(kv.klest_ppo_loss, kl="klest:verl@0.9.1:low_var_kl")
    mine, my_grad, metrics = _loss_and_grad(loss_fn, config, flat, data, where)
    theirs, their_grad, their_metrics = _loss_and_grad(ppo_loss, config, flat, data, where)
    torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(my_grad, their_grad, rtol=1e-12, atol=1e-15)
    assert metrics.keys() == their_metrics.keys()


def test_klest_ppo_loss_sequence_k1_is_the_reward_to_go_of_the_log_ratio():
    """On-policy (old = current log-probs), seq-mean-token-sum: the KL term is β·mean_b Σ_t ℓ_bt
    and its derivative at token t is β/B · Σ_{s>=t} ℓ_bs on valid tokens."""
    config, flat, data, logp, ref, _, mask, where = _batch(13)
    data["old_log_probs"] = logp.clone()
    loss_fn = functools.partial(kv.klest_ppo_loss, kl="sequence_kl:k1")
    loss, grad, metrics = _loss_and_grad(loss_fn, config, flat, data, where)
    base, base_grad, _ = _loss_and_grad(
        ppo_loss, _batch(13, use_kl_loss=False)[0], flat, data, where
    )
    ell = (logp - ref) * mask
    b = len(LENGTHS)
    torch.testing.assert_close(loss - base, BETA * ell.sum() / b, rtol=1e-12, atol=1e-14)
    to_go = ell.flip(-1).cumsum(-1).flip(-1) * mask
    torch.testing.assert_close(grad - base_grad, BETA * to_go / b, rtol=1e-10, atol=1e-14)
    assert float(metrics["kl_loss"].values[0]) == pytest.approx(float(ell.sum() / b), rel=1e-12)


def test_klest_ppo_loss_sequence_k1_off_policy_is_klest_sequence_kl():
    """Later PPO epochs (old_log_probs ≠ current): klest.rl.sequence_kl's per-decision weighted
    terms, reduced as asked (here verl's token-mean)."""
    config, flat, data, logp, ref, old, mask, where = _batch(18)
    loss_fn = functools.partial(kv.klest_ppo_loss, kl="sequence_kl:k1", aggregation="token-mean")
    loss, grad, _ = _loss_and_grad(loss_fn, config, flat, data, where)
    base, base_grad, _ = _loss_and_grad(
        ppo_loss, _batch(18, use_kl_loss=False)[0], flat, data, where
    )
    x = logp.clone().requires_grad_()
    terms = klest.rl.sequence_kl(x, ref, old_logp=old, mask=mask.bool(), estimator="k1").terms
    expected = (terms * mask).sum() / mask.sum()
    expected.backward()
    torch.testing.assert_close(loss - base, BETA * expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad - base_grad, BETA * x.grad, rtol=1e-10, atol=1e-14)


def test_klest_ppo_loss_token_term_gets_the_importance_weight():
    """A klest name in klest_ppo_loss is weighted by the detached π/π_old (old_log_probs)."""
    config, flat, data, logp, ref, old, mask, where = _batch(14, agg="token-mean")
    loss_fn = functools.partial(kv.klest_ppo_loss, kl="klest:k3")
    loss, grad, _ = _loss_and_grad(loss_fn, config, flat, data, where)
    base, base_grad, _ = _loss_and_grad(
        ppo_loss, _batch(14, use_kl_loss=False)[0], flat, data, where
    )
    ell, w, n = logp - ref, torch.exp(logp - old), mask.sum()
    torch.testing.assert_close(
        loss - base, BETA * (w * (torch.expm1(-ell) + ell) * mask).sum() / n, rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(grad - base_grad, BETA * w * ell * mask / n, rtol=1e-10, atol=1e-14)


def test_klest_ppo_loss_without_use_kl_loss_is_ppo_loss():
    config, flat, data, *_, where = _batch(15, use_kl_loss=False)
    mine, my_grad, _ = _loss_and_grad(kv.klest_ppo_loss, config, flat, data, where)
    theirs, their_grad, _ = _loss_and_grad(ppo_loss, config, flat, data, where)
    assert torch.equal(mine, theirs) and torch.equal(my_grad, their_grad)


@pytest.mark.parametrize("kl", ["sequence_kl", "sequence_kl:full", "sequence_kl:mix", "full_kl"])
def test_klest_ppo_loss_refuses_terms_that_need_reference_logits(kl):
    config, flat, data, *_ = _batch(16)
    with pytest.raises(KlestError, match="logits") as err:
        kv.klest_ppo_loss(config, {"log_probs": flat}, data, kl=kl)
    assert err.value.argument == "kl"


def test_klest_ppo_loss_refuses_unknown_kl():
    config, flat, data, *_ = _batch(17)
    with pytest.raises(KlestError) as err:
        kv.klest_ppo_loss(config, {"log_probs": flat}, data, kl="k3")
    assert err.value.argument == "kl"


# ------------------------------------------------------------------------------ Ray workers
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_ray_setup_hook_installs_in_workers():
    """The driver has not installed (a driver patch would not reach the worker anyway); the
    worker_process_setup_hook named in the docs does, in every worker process."""
    ray = pytest.importorskip("ray")
    kv.uninstall()
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"worker_process_setup_hook": "klest.integrations.verl.install"},
    )
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    try:  # verl's own function, run in a worker (pickled by reference to verl)
        got = ray.get(ray.remote(core_algos.kl_penalty).remote(logp, ref, "klest:k1"))
    finally:
        ray.shutdown()
    assert got.tolist() == [[0.5, -1.0]]  # ℓ = logp - ref, exact in float32
    assert not kv.installed()  # the driver was never patched


def test_the_documented_command_line_composes_with_verls_config():
    """The overrides docs/trainers.md shows for `python -m verl.trainer.main_ppo`, on verl's own
    hydra config: the KL names reach the configs, the hook's dotted path is install()."""
    hydra = pytest.importorskip("hydra")
    overrides = [
        "actor_rollout_ref.actor.use_kl_loss=True",
        "actor_rollout_ref.actor.kl_loss_type=klest:k3",
        "algorithm.use_kl_in_reward=True",
        "algorithm.kl_penalty=klest:k1",
        "+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=klest.integrations.verl.install",
    ]
    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    with hydra.initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra.compose("ppo_trainer", overrides=overrides)
    assert cfg.actor_rollout_ref.actor.kl_loss_type == "klest:k3"
    assert cfg.algorithm.kl_penalty == "klest:k1"
    hook = cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook
    module, _, attr = hook.rpartition(".")
    assert getattr(importlib.import_module(module), attr) is kv.install
