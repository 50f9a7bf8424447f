r"""klest's KL terms in OpenRLHF 0.11.2: :func:`install`.

OpenRLHF computes every KL with ``openrlhf/models/utils.py::compute_approx_kl(log_probs,
log_probs_base, log_probs_old=None, kl_estimator="k1", unbiased_gradient=False)`` (k1/k2/k3,
clamped to [-10, 10]), which two modules import *by name*: ``trainer/ray/ppo_actor.py`` (the KL
loss, ``--algo.kl.use_loss``) and ``trainer/ppo_utils/experience_maker.py`` (the KL in the
reward). :func:`install` wraps it and rebinds the name wherever it was imported, so that a
``kl_estimator`` (``--algo.kl.estimator``) starting with ``"klest:"`` computes klest's term
(:mod:`klest.integrations._kl_names`: ``"klest:<preset>"`` or ``"klest:<estimator>[:<gradient>]"``;
``"klest:k3"`` is klest's default: value k3, per-token derivative ℓ = logp - ref_logp, whose
expectation is ∇KL(π‖π_ref)); ``"k1"``, ``"k2"``, ``"k3"`` reach OpenRLHF's own code unchanged.

**Order.** :func:`install` imports ``openrlhf.models.utils`` (the origin) and replaces
``compute_approx_kl`` there first, so a module that imports it by name *later* gets klest's; then
it rebinds the name in every module already loaded that holds OpenRLHF's function (``ppo_actor``,
``experience_maker``, or your own). Call it before OpenRLHF's trainer runs; calling it again is
harmless, and it also catches modules loaded since the last call. Do not keep a reference to the
function from before :func:`install` (``f = compute_approx_kl``): that one stays OpenRLHF's.

**What a klest name computes.** The term of the name with ``log_probs_old`` as its importance
weight where the name uses one: presets follow their own rule (``"klest:openrlhf:k3"`` equals
OpenRLHF's ``"k3"``, ``"klest:openrlhf:k3:unbiased_gradient"`` equals ``"k3"`` with
``unbiased_gradient=True``), and ``"klest:<estimator>..."`` options weight by the detached
π/π_old (the KL loss passes the rollout policy's log-probs; in the reward there are none: weight
1). ``unbiased_gradient=True`` keeps OpenRLHF's meaning, straight-through: the value of the klest
term, the gradient of w·½ℓ² with w = min(π/π_old, 10) detached (1 without ``log_probs_old``).

**Command line.** OpenRLHF's ``train_ppo_ray`` restricts ``--algo.kl.estimator`` to k1/k2/k3
(argparse ``choices``): a klest name needs a launcher that builds the arguments itself (or edits
them after parsing) and calls ``openrlhf.cli.train_ppo_ray.train(args)``.

**Ray.** A patch in the driver does not reach OpenRLHF's Ray actors, and both KLs are computed
in actors: the KL loss in ``PolicyModelActor``, the KL in the reward in ``PPOTrainer`` (a Ray actor
that makes the experience). Start Ray yourself before ``train(args)`` (which then skips its own
``ray.init``) with ``ray.init(runtime_env={"worker_process_setup_hook":
"klest.integrations.openrlhf.install", "env_vars": {...}})``: every worker process runs
:func:`install` before it imports OpenRLHF's trainer modules.

Importing this module imports ``openrlhf.models.utils`` (and so DeepSpeed; ``pip install
'klest[openrlhf]'``); ``import klest`` and ``import klest.integrations`` do not.
"""

from __future__ import annotations

import sys
import unittest
from collections.abc import Callable
from typing import Any

import torch

from ..rl.penalty import kl_per_token
from ._kl_names import is_klest_name, parse


class _OpenRLHFMissing(ImportError, unittest.SkipTest):
    """OpenRLHF is not installed (an ImportError; test collectors treat it as a skip)."""


try:
    import openrlhf.models.utils as _origin
except ImportError as _e:  # pragma: no cover - exercised only without OpenRLHF
    raise _OpenRLHFMissing(
        "klest.integrations.openrlhf needs OpenRLHF 0.11.2: pip install 'klest[openrlhf]'"
    ) from _e

__all__ = ["install", "installed", "patched_modules", "uninstall"]

#: where a bad ``"klest:..."`` name came from, as :class:`klest.KlestError` names it
ARGUMENT = "kl_estimator"
_ATTR = "compute_approx_kl"
_ORIGINAL = "__klest_original__"
_DEFAULT_WEIGHT_CLIP = 10.0  # OpenRLHF 0.11.2's KL_IS_WEIGHT_CLIP


def _compute_approx_kl(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def compute_approx_kl(
        log_probs: torch.Tensor,
        log_probs_base: torch.Tensor,
        log_probs_old: torch.Tensor | None = None,
        kl_estimator: str = "k1",
        unbiased_gradient: bool = False,
    ) -> torch.Tensor:
        if not is_klest_name(kl_estimator):
            return original(
                log_probs,
                log_probs_base,
                log_probs_old=log_probs_old,
                kl_estimator=kl_estimator,
                unbiased_gradient=unbiased_gradient,
            )
        term = parse(kl_estimator, ARGUMENT).per_token(
            log_probs, log_probs_base, old_logp=log_probs_old
        )
        if not unbiased_gradient:
            return term
        # OpenRLHF's straight-through: value of the term, gradient of w·½ℓ², w = min(π/π_old, c)
        clip = float(getattr(_origin, "KL_IS_WEIGHT_CLIP", _DEFAULT_WEIGHT_CLIP))
        surrogate = kl_per_token(
            log_probs,
            log_probs_base,
            old_logp=log_probs_old,
            estimator="k2",
            gradient="reverse_kl",
            weight="gradient_only",
            weight_clamp=clip,
        )
        return term.detach() + (surrogate - surrogate.detach()).to(term.dtype)

    compute_approx_kl.__doc__ = (
        "OpenRLHF's compute_approx_kl, with klest's term for kl_estimator names starting with "
        "'klest:' (klest.integrations.openrlhf.install).\n\n" + (original.__doc__ or "")
    )
    setattr(compute_approx_kl, _ORIGINAL, original)
    return compute_approx_kl


def _holders(fn: Any) -> list[Any]:
    """The loaded modules whose global ``compute_approx_kl`` is ``fn`` (read from the module's
    ``__dict__``: a lazy module's ``__getattr__`` is never triggered)."""
    found = []
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get(_ATTR) is fn:
            found.append(module)
    return found


def installed() -> bool:
    """Whether :func:`install` is in effect (in ``openrlhf.models.utils``) in this process."""
    return hasattr(getattr(_origin, _ATTR), _ORIGINAL)


def install() -> None:
    """Make ``"klest:..."`` names valid ``kl_estimator`` values in this process.

    Replaces ``compute_approx_kl`` in ``openrlhf.models.utils`` (later ``from ... import
    compute_approx_kl`` get klest's), then in every loaded module that imported OpenRLHF's function
    by name (``openrlhf.trainer.ray.ppo_actor``, ``openrlhf.trainer.ppo_utils.experience_maker``).
    Idempotent; takes no argument, so it serves as Ray's ``worker_process_setup_hook``
    (``"klest.integrations.openrlhf.install"``). :func:`uninstall` undoes it.
    """
    current = getattr(_origin, _ATTR)
    if hasattr(current, _ORIGINAL):
        wrapper, original = current, getattr(current, _ORIGINAL)
    else:
        original, wrapper = current, _compute_approx_kl(current)
        setattr(_origin, _ATTR, wrapper)
    for module in _holders(original):
        setattr(module, _ATTR, wrapper)


def uninstall() -> None:
    """Undo :func:`install` everywhere it rebound the name; a no-op if not installed."""
    current = getattr(_origin, _ATTR)
    if not hasattr(current, _ORIGINAL):
        return
    original = getattr(current, _ORIGINAL)
    for module in _holders(current):
        setattr(module, _ATTR, original)


def patched_modules() -> list[str]:
    """The names of the loaded modules whose ``compute_approx_kl`` is klest's (sorted)."""
    current = getattr(_origin, _ATTR)
    if not hasattr(current, _ORIGINAL):
        return []
    return sorted(m.__name__ for m in _holders(current))
