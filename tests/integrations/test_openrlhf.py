"""klest.integrations.openrlhf against the real OpenRLHF 0.11.2 sources, on a CPU.

Tested the way OpenRLHF tests itself without GPUs: its modules are loaded from the installed
wheel's files with DeepSpeed (imported at the top of ``models/utils.py``) and the GPU-only parts
of ``ppo_actor.py``'s imports stubbed, and its packages' ``__init__`` files are not run. OpenRLHF's
pins conflict with the main test environment, so these tests run in ``.venv-trainers`` (``make
test-trainers``, part of ``make test``); elsewhere they skip. Expected values: OpenRLHF's own
function for OpenRLHF's names, closed forms in float64 for klest's (k3 = e^{-ℓ} - 1 + ℓ, the
reverse-KL derivative ℓ, the importance weight π/π_old).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from unittest.mock import MagicMock

import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("openrlhf") is None:
    pytest.skip(
        "OpenRLHF 0.11.2 runs in .venv-trainers (make test-trainers)", allow_module_level=True
    )

import klest.rl  # noqa: E402
from klest import KlestError  # noqa: E402

# OpenRLHF's models/utils.py applies torch.compile at import, which imports torch's inductor and
# its deprecated torch.jit.script_method uses
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
ROOT = Path(importlib.util.find_spec("openrlhf").submodule_search_locations[0])
KL_CTL = 0.25


def _module(name: str, *, package: bool = False, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:  # the real folder, so that its files import; its __init__ is never run
        module.__path__ = [str(ROOT.joinpath(*name.split(".")[1:]))]
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


@pytest.fixture(scope="module")
def orl():
    """OpenRLHF's modules (real files; heavy imports stubbed), restored afterwards."""
    before = dict(sys.modules)
    if importlib.util.find_spec("deepspeed") is None:
        _module("deepspeed")
    for name in (
        "openrlhf",
        "openrlhf.models",
        "openrlhf.trainer",
        "openrlhf.trainer.ray",
        "openrlhf.trainer.ppo_utils",
        "openrlhf.utils",
        "openrlhf.utils.deepspeed",
    ):
        _module(name, package=True)
    utils = importlib.import_module("openrlhf.models.utils")
    loss = importlib.import_module("openrlhf.models.loss")
    sys.modules["openrlhf.models"].__dict__.update(
        Actor=MagicMock(), PolicyLoss=MagicMock(), aggregate_loss=loss.aggregate_loss
    )
    sys.modules["openrlhf.utils"].get_tokenizer = MagicMock()
    sys.modules["openrlhf.utils.deepspeed"].DeepspeedStrategy = MagicMock()
    sys.modules["openrlhf.trainer.ppo_utils"].NaiveReplayBuffer = MagicMock()
    _module("openrlhf.utils.utils", zero_pad_sequences=MagicMock())
    _module(
        "openrlhf.utils.deepspeed.deepspeed_utils",
        offload_deepspeed_states=MagicMock(),
        reload_deepspeed_states=MagicMock(),
    )
    _module(
        "openrlhf.utils.distributed_util",
        stateless_init_process_group=MagicMock(),
        torch_dist_barrier_and_cuda_sync=MagicMock(),
    )
    _module("openrlhf.utils.vlm_utils", merge_mm_train_inputs=MagicMock())
    _module("openrlhf.trainer.ray.launcher", BaseModelActor=object, RayActorGroup=MagicMock())
    _module("openrlhf.trainer.ray.utils", get_physical_gpu_id=MagicMock())
    maker = importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    import klest.integrations.openrlhf as ko

    ko.uninstall()
    ns = types.SimpleNamespace(utils=utils, maker=maker, ko=ko, original=utils.compute_approx_kl)
    yield ns
    ko.uninstall()
    for name in set(sys.modules) - set(before):
        if name.startswith(("openrlhf", "deepspeed")):
            del sys.modules[name]


@pytest.fixture
def installed(orl):
    orl.ko.install()
    yield orl
    orl.ko.uninstall()


def _inputs(seed: int, shape=(3, 7), spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    ref = logp + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    old = logp + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
    return logp, ref, old


def _value_and_grad(fn, logp):
    x = logp.detach().clone().requires_grad_()
    out = fn(x)
    out.sum().backward()
    return out.detach(), x.grad


# --------------------------------------------------------------------------- where it patches
def test_install_patches_loaded_modules_later_imports_and_uninstalls(orl):
    ko, utils, maker, original = orl.ko, orl.utils, orl.maker, orl.original
    assert maker.compute_approx_kl is original and not ko.installed()
    ko.install()
    wrapper = utils.compute_approx_kl
    assert wrapper is not original and wrapper.__klest_original__ is original
    assert maker.compute_approx_kl is wrapper  # imported by name before install: rebound
    actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")  # imported after install
    assert actor.compute_approx_kl is wrapper
    ko.install()  # idempotent
    assert utils.compute_approx_kl is wrapper
    assert ko.patched_modules() == [
        "openrlhf.models.utils",
        "openrlhf.trainer.ppo_utils.experience_maker",
        "openrlhf.trainer.ray.ppo_actor",
    ]
    ko.uninstall()
    assert utils.compute_approx_kl is maker.compute_approx_kl is actor.compute_approx_kl
    assert actor.compute_approx_kl is original and ko.patched_modules() == []
    ko.install()  # a module loaded before this install (ppo_actor now) is rebound too
    assert actor.compute_approx_kl is utils.compute_approx_kl is not original
    ko.uninstall()


# ----------------------------------------------------------------------------- values, grads
def test_klest_default_in_the_reward_is_k3_with_the_reverse_kl_gradient(installed):
    logp, ref, _ = _inputs(1)
    ell = logp - ref
    value, grad = _value_and_grad(
        lambda x: installed.maker.compute_approx_kl(x, ref, kl_estimator="klest:k3"), logp
    )
    torch.testing.assert_close(value, torch.expm1(-ell) + ell, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ell, rtol=1e-12, atol=1e-14)


def test_klest_options_take_the_detached_importance_weight(installed):
    """In the KL loss OpenRLHF passes the rollout policy's log-probs: value w·k3, derivative
    w·ℓ with w = π/π_old held fixed (klest.rl.kl_per_token with old_logp)."""
    logp, ref, old = _inputs(2)
    ell, w = logp - ref, torch.exp(logp - old)
    fn = installed.utils.compute_approx_kl
    value, grad = _value_and_grad(
        lambda x: fn(x, ref, log_probs_old=old, kl_estimator="klest:k3"), logp
    )
    torch.testing.assert_close(value, w * (torch.expm1(-ell) + ell), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, w * ell, rtol=1e-12, atol=1e-14)
    ev, eg = _value_and_grad(lambda x: klest.rl.kl_per_token(x, ref, old_logp=old), logp)
    assert torch.equal(value, ev) and torch.equal(grad, eg)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_openrlhf_presets_equal_openrlhf_including_clamps(installed, est, unbiased):
    """klest:openrlhf@0.11.2:<est>[:unbiased_gradient] is OpenRLHF's <est>: ℓ spans ±15 so that
    the [-10, 10] clamps bind, and π/π_old spans e^{±4} so that the weight clip at 10 binds."""
    g = torch.Generator().manual_seed(3)  # float32: OpenRLHF computes in float32 (.float())
    logp = -torch.rand(6, 20, generator=g) * 4
    ref = logp - torch.linspace(-15, 15, 120).reshape(6, 20)
    old = logp - torch.linspace(-4, 4, 120).reshape(6, 20).flip(-1)
    fn, original = installed.utils.compute_approx_kl, installed.original
    name = f"klest:openrlhf@0.11.2:{est}" + (":unbiased_gradient" if unbiased else "")
    mine, my_grad = _value_and_grad(
        lambda x: fn(x, ref, log_probs_old=old, kl_estimator=name), logp
    )
    theirs, their_grad = _value_and_grad(
        lambda x: original(x, ref, log_probs_old=old, kl_estimator=est, unbiased_gradient=unbiased),
        logp,
    )
    # OpenRLHF's straight-through v + s - sg(s) rounds v to a float32 ulp of s = w·ℓ²/2
    ell, w = (logp - ref).double(), torch.exp(logp - old).double().clamp(max=10.0)
    surrogate = float((w * ell**2 / 2).max()) if unbiased else 0.0
    atol = 2 * torch.finfo(torch.float32).eps * max(surrogate, 1.0)
    torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=atol)
    torch.testing.assert_close(my_grad, their_grad, rtol=1e-6, atol=1e-6)
    assert (theirs.abs() == 10).any()  # the value clamp bound somewhere


def test_unbiased_gradient_flag_keeps_openrlhfs_meaning_for_klest_names(installed):
    """unbiased_gradient=True with a klest name: value of the klest term, derivative
    min(π/π_old, 10)·ℓ (OpenRLHF's straight-through), whatever the name's own gradient."""
    logp, ref, old = _inputs(4)
    old = old.clone()
    old[0, 0] = logp[0, 0] - 3.0  # π/π_old = e^3 > 10: the clip binds
    ell, w = logp - ref, torch.exp(logp - old)
    fn = installed.utils.compute_approx_kl
    value, grad = _value_and_grad(
        lambda x: fn(
            x, ref, log_probs_old=old, kl_estimator="klest:k3:forward_kl", unbiased_gradient=True
        ),
        logp,
    )
    torch.testing.assert_close(value, w * (torch.expm1(-ell) + ell), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, w.clamp(max=10.0) * ell, rtol=1e-12, atol=1e-14)
    assert w[0, 0] > 10


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_openrlhfs_own_names_are_unchanged(installed, est, unbiased):
    logp, ref, old = _inputs(5, spread=4.0)
    fn, original = installed.utils.compute_approx_kl, installed.original
    kwargs = {"log_probs_old": old, "kl_estimator": est, "unbiased_gradient": unbiased}
    mine, my_grad = _value_and_grad(lambda x: fn(x, ref, **kwargs), logp)
    theirs, their_grad = _value_and_grad(lambda x: original(x, ref, **kwargs), logp)
    assert torch.equal(mine, theirs) and torch.equal(my_grad, their_grad)


def test_openrlhfs_errors_are_unchanged(installed):
    logp, ref, _ = _inputs(6)
    with pytest.raises(ValueError, match="Unknown kl_estimator: k4"):
        installed.utils.compute_approx_kl(logp, ref, kl_estimator="k4")


@pytest.mark.parametrize(
    "name, words",
    [
        ("klest:k4", "unknown estimator 'k4'"),
        ("klest:openrlhf:k5", "unknown preset"),
        ("klest:k3+", "unknown estimator"),
        ("klest:k1:sequence_reverse_kl", "couples the tokens of a row"),
    ],
)
def test_bad_klest_names_raise_naming_kl_estimator(installed, name, words):
    logp, ref, _ = _inputs(7)
    with pytest.raises(KlestError) as err:
        installed.maker.compute_approx_kl(logp, ref, kl_estimator=name)
    assert err.value.argument == "kl_estimator"
    assert repr(name) in str(err.value) and words in str(err.value)


# -------------------------------------------------------------- the actor's KL loss, end to end
def _training_step(orl, estimator: str, *, unbiased: bool = False):
    """OpenRLHF's ActorPPOTrainer.training_step on a stand-in trainer whose actor returns the
    given log-probs and whose policy loss is 0: the loss it backpropagates is kl_ctl · KL."""
    actor_module = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
    experience_cls = importlib.import_module("openrlhf.trainer.ppo_utils.experience").Experience
    logp, ref, old = _inputs(8)
    mask = torch.ones_like(logp, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    leaf = logp.clone().requires_grad_()
    seen = {}

    def backward(loss, model, optimizer):
        seen["loss"] = loss.detach()
        loss.backward()

    ns = types.SimpleNamespace
    args = ns(
        algo=ns(
            kl=ns(use_loss=True, init_coef=KL_CTL, estimator=estimator, unbiased_gradient=unbiased)
        ),
        actor=ns(entropy_coef=None, aux_loss_coef=0.0),
        train=ns(dynamic_batch_enable=False),
    )
    trainer = ns(
        actor=MagicMock(return_value=(leaf, ns(aux_loss=None, entropy=None))),
        actor_loss_fn=lambda lp, *a, **k: (
            (lp * 0).sum(),
            torch.zeros(()),
            torch.zeros(()),
            None,
            None,
        ),
        args=args,
        strategy=ns(
            ring_attn_group=None,
            backward=backward,
            optimizer_step=lambda *a, **k: None,
            get_grad_norm=lambda model: 0.0,
        ),
        aux_loss=False,
        ema_model=None,
        actor_optim=None,
        actor_scheduler=ns(get_last_lr=lambda: [0.0]),
    )
    experience = experience_cls(
        sequences=torch.zeros(3, 10, dtype=torch.long),
        attention_mask=torch.ones(3, 10, dtype=torch.long),
        action_mask=mask,
        action_log_probs=old,
        base_action_log_probs=ref,
        advantages=torch.zeros_like(logp),
    )
    actor_module.ActorPPOTrainer.training_step(trainer, experience, KL_CTL, 0, loss_batch_info={})
    return seen["loss"], leaf.grad, logp, ref, old, mask


def test_ppo_actor_kl_loss_with_klest_default_equals_klest_kl_loss(installed):
    loss, grad, logp, ref, old, mask = _training_step(installed, "klest:k3")
    x = logp.clone().requires_grad_()
    expected = klest.rl.kl_loss(x, ref, old_logp=old, mask=mask, aggregation="token-mean")
    expected.loss.backward()
    torch.testing.assert_close(loss, KL_CTL * expected.loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, KL_CTL * x.grad, rtol=1e-12, atol=1e-14)
    ell, w = logp - ref, torch.exp(logp - old)  # closed form: token mean of w·ℓ on valid tokens
    torch.testing.assert_close(grad, KL_CTL * w * ell * mask / mask.sum(), rtol=1e-12, atol=1e-14)


def test_ppo_actor_kl_loss_with_the_openrlhf_preset_equals_openrlhf(installed):
    mine, my_grad, *_ = _training_step(installed, "klest:openrlhf@0.11.2:k3")
    installed.ko.uninstall()
    theirs, their_grad, *_ = _training_step(installed, "k3")  # OpenRLHF computes in float32
    torch.testing.assert_close(mine, theirs.to(mine.dtype), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(my_grad, their_grad, rtol=1e-6, atol=1e-7)
