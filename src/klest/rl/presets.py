"""What the RL frameworks compute today, by name, so that switching to klest changes nothing.

Each preset is a per-token function ``preset(logp, ref_logp, *, old_logp=None, mask=None)`` with
the framework's value *and* gradient (clamps included), built on :func:`klest.rl.kl_per_token`,
and a ``loss(...)`` method that reduces it with :func:`klest.rl.kl_loss`. Its ``follows``
attribute (and the first line of its ``__doc__``) says what its expected gradient follows; once you
have matched your framework, switch to a preset (or option) whose gradient follows the divergence
you meant.

>>> from klest.rl import presets
>>> presets.get("verl:low_var_kl").follows
'forward KL(π_ref‖π), not the reverse KL it reports (zero where a clamp binds)'

Names carry the release they reproduce, ``"<framework>@<version>:<option>"`` (``RELEASES``):
verl 0.9.1, OpenRLHF 0.11.2, TRL 1.16.0, NeMo-RL 0.6.0 and 0.7.0, slime 0.3.1 (the code is the same
from v0.2.1 on). A name without ``@`` (``"nemo_rl:k3"``) means the newest release klest knows.
``"slime@0.4.0:..."`` (a release that does not exist; klest named it so before 2027-01) still
resolves to ``"slime@0.3.1:..."`` with a one-time ``FutureWarning``. ℓ = logp - ref_logp.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import KlestError
from .penalty import KLLoss, kl_loss, kl_per_token

__all__ = ["DEPRECATED_RELEASES", "RELEASES", "Preset", "get", "names", "register"]

_NOTHING = "nothing: its expected gradient is 0 (E_π[∇ℓ] = 0)"
_REVERSE = "reverse KL(π‖π_ref) (the exact score-function gradient, k2's)"
_FORWARD = "forward KL(π_ref‖π), not the reverse KL it reports (zero where a clamp binds)"
_ABS = "no divergence: E_π[sign(ℓ)·∇log π], each token's |ℓ| pushed down"


@dataclass(frozen=True)
class Preset:
    """A framework's per-token KL term. Call it like :func:`klest.rl.kl_per_token`."""

    name: str
    follows: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    uses_old_logp: bool = False

    def __post_init__(self) -> None:
        doc = f"Gradient follows {self.follows}.\n\n{self.description}"
        object.__setattr__(self, "__doc__", doc)

    def _old(self, old_logp: torch.Tensor | None) -> torch.Tensor | None:
        return old_logp if self.uses_old_logp else None

    def __call__(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        *,
        old_logp: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kl_per_token(logp, ref_logp, old_logp=self._old(old_logp), mask=mask, **self.options)

    def loss(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor,
        *,
        old_logp: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> KLLoss:
        """:func:`klest.rl.kl_loss` with this preset's options (``aggregation=`` etc. pass on)."""
        return kl_loss(
            logp, ref_logp, old_logp=self._old(old_logp), mask=mask, **self.options, **kwargs
        )


_REGISTRY: dict[str, Preset] = {}


def register(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Add a preset (e.g. your own framework's) under ``preset.name``."""
    if preset.name in _REGISTRY and not overwrite:
        raise KlestError(f"preset {preset.name!r} exists (overwrite=True replaces it)")
    _REGISTRY[preset.name] = preset
    return preset


# framework -> the releases klest reproduces, oldest first; a name without "@" means the newest
RELEASES: dict[str, tuple[str, ...]] = {
    "verl": ("0.9.1",),
    "openrlhf": ("0.11.2",),
    "trl": ("1.16.0",),
    "nemo_rl": ("0.6.0", "0.7.0"),
    "slime": ("0.3.1",),
}

# "<framework>@<version>" names klest used for a release that does not exist -> the right one;
# resolved by :func:`get` with a FutureWarning, once per name per process
DEPRECATED_RELEASES: dict[str, str] = {"slime@0.4.0": "slime@0.3.1"}
_WARNED: set[str] = set()


def _undeprecated(name: str) -> str:
    """``name`` with a deprecated release replaced by the right one (a warning, once per name)."""
    release, sep, option = name.partition(":")
    new = DEPRECATED_RELEASES.get(release)
    if not sep or new is None:
        return name
    full = f"{new}:{option}"
    if full not in _REGISTRY:
        return name  # no such option: the caller's "unknown preset" error, without a warning
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(
            f"klest preset {name!r} is deprecated: {release} was never released; the code it "
            f"reproduces is {new}'s, so use {full!r}",
            FutureWarning,
            stacklevel=3,
        )
    return full


def _versioned(name: str) -> str:
    """``"fw:option"`` -> ``"fw@<newest release>:option"``; other names unchanged."""
    fw, sep, option = name.partition(":")
    if sep and "@" not in fw and fw in RELEASES:
        return f"{fw}@{RELEASES[fw][-1]}:{option}"
    return name


def get(name: str) -> Preset:
    """The preset called ``name``: ``"<framework>@<version>:<option>"`` (see :func:`names`), or
    ``"<framework>:<option>"`` for the newest release klest knows."""
    if not isinstance(name, str):
        raise KlestError("must be a preset name (str)", argument="name", value=name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    full = _versioned(_undeprecated(name))
    if full.startswith("verl@") and full.endswith(":full"):
        raise KlestError(
            "verl's 'full' raises NotImplementedError there too; the full-vocabulary KL needs "
            "the logits, not the sampled tokens' log-probs",
            argument="name",
        )
    try:
        return _REGISTRY[full]
    except KeyError:
        raise KlestError(
            f"unknown preset {name!r}; known: {', '.join(names())} (a name without '@' means "
            "the newest release)",
            argument="name",
        ) from None


def names() -> list[str]:
    """The registered preset names, with the release they reproduce, sorted."""
    return sorted(_REGISTRY)


def _add(
    name: str, follows: str, description: str, *, uses_old: bool = False, **options: Any
) -> None:
    fw, _, option = name.partition(":")
    for version in RELEASES[fw] if "@" not in fw else (fw.partition("@")[2],):
        full = f"{fw.partition('@')[0]}@{version}:{option}"
        register(Preset(full, follows, description, dict(options), uses_old))


# ------------------------------------------------------------------------------------------ verl
_VERL = {
    "kl": ("k1", _NOTHING, "ℓ, no clamp."),
    "abs": ("abs", _ABS, "|ℓ|, no clamp."),
    "mse": ("k2", _REVERSE, "½ℓ², no clamp."),
    "low_var_kl": (
        "k3",
        _FORWARD,
        "k3 = e^{-ℓ'} - 1 + ℓ' with ℓ' = ℓ clipped to [-20, 20], the result clipped to "
        "[-10, 10]; gradient of that expression (zero where either clamp binds).",
    ),
}
_VERL_ALIASES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}
for _name, (_est, _follows, _desc) in _VERL.items():
    _clamps: dict[str, Any] = {"clamp": 20.0, "value_clamp": 10.0} if _name == "low_var_kl" else {}
    for _n in [_name] + [a for a, t in _VERL_ALIASES.items() if t == _name]:
        _add(
            f"verl:{_n}",
            _follows,
            f"verl kl_penalty {_n!r}: {_desc}",
            estimator=_est,
            gradient="as_written",
            **_clamps,
        )
        _add(
            f"verl:{_n}+",
            _REVERSE,
            f"verl kl_penalty {_n + '+'!r}: the value of {_n!r} ({_desc.rstrip('.')}), "
            "straight-through: value kN, gradient of ½ℓ² (unclipped).",
            estimator=_est,
            gradient="reverse_kl",
            **_clamps,
        )

# -------------------------------------------------------------------------------------- OpenRLHF
_ORL: dict[str, tuple[str, str, dict[str, Any]]] = {
    "k1": ("k1", _NOTHING, {}),
    "k2": ("k2", _REVERSE, {}),
    "k3": ("k3", _FORWARD, {"clamp": (-float("inf"), 10.0)}),
}
for _n, (_est, _follows, _extra) in _ORL.items():
    _pre = " with ℓ clipped below at -10 before the exp" if _n == "k3" else ""
    _add(
        f"openrlhf:{_n}",
        _follows if _n != "k2" else _REVERSE[:-1] + "; zero where the clamp binds)",
        f"OpenRLHF compute_approx_kl, kl_estimator={_n!r}: {_n}{_pre}, the result clipped to "
        "[-10, 10]; gradient of that expression.",
        estimator=_est,
        gradient="as_written",
        value_clamp=10.0,
        **_extra,
    )
    _add(
        f"openrlhf:{_n}:unbiased_gradient",
        "reverse KL(π‖π_ref), biased where π/π_old > 10 (the weight is clipped there)",
        f"OpenRLHF compute_approx_kl with its unbiased-gradient option: value {_n} (as "
        f"'openrlhf:{_n}', not weighted), gradient of ½ℓ² (unclipped) times the detached "
        "weight min(π/π_old, 10) (weight 1 without old_logp).",
        uses_old=True,
        estimator=_est,
        gradient="reverse_kl",
        weight="gradient_only",
        value_clamp=10.0,
        weight_clamp=10.0,
        **_extra,
    )

# ------------------------------------------------------------------------------------------- TRL
_add(
    "trl:grpo",
    _FORWARD.replace(" (zero where a clamp binds)", ""),
    "TRL GRPOTrainer per-token KL: k3 = e^{-ℓ} + ℓ - 1, no clamp; gradient of that expression.",
    estimator="k3",
    gradient="as_written",
)
_add(
    "trl:grpo:bias_correction",
    "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[k3])",
    "TRL GRPOTrainer with use_bias_correction_kl: k3 times the non-detached weight π/π_old "
    "(exp(logp - sg(logp)) = 1 without old_logp, as TRL does on-policy).",
    uses_old=True,
    estimator="k3",
    gradient="as_written",
    weight="differentiable",
)

_add(
    "trl:grpo:bias_correction:sequence",
    "no divergence in general: the weight exp(mean_t ℓ_t^old) is a geometric mean, not the "
    "likelihood ratio of the sequence (for one-token rows: k3 × π/π_old, the reverse KL)",
    "TRL GRPOTrainer with use_bias_correction_kl and importance_sampling_level='sequence': k3 "
    "times the non-detached sequence weight exp(Σ_t m_t (logp_t - old_t) / max(Σ_t m_t, 1)), "
    "the same for every token of a row (1 without old_logp).",
    uses_old=True,
    estimator="k3",
    gradient="as_written",
    weight="differentiable",
    weight_level="sequence",
)

# --------------------------------------------------------------------------------------- NeMo-RL
_NEMO = {
    "k1": ("k1", _NOTHING, "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[ℓ])"),
    "k2": ("k2", _REVERSE[:-1] + "; zero where a clamp binds)", "½E_π[ℓ²], not the KL"),
    "k3": ("k3", _FORWARD, "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[k3])"),
}
for _n, (_est, _follows, _follows_is) in _NEMO.items():
    _desc = (
        f"NeMo-RL {_n} with its clamps: ℓ clipped to [-20, 20] before the estimator, the result "
        "clipped to [-10, 10]"
    )
    _add(
        f"nemo_rl@0.6.0:{_n}",
        _follows,
        _desc + "; gradient of that expression.",
        estimator=_est,
        gradient="as_written",
        clamp=20.0,
        value_clamp=10.0,
    )
    # 0.6.0 (tag 5fb5889, loss_functions.py): the clamped value times the *detached* weight
    # exp(curr - generation) (NaN/inf set to 0 there); the detach went in NeMo-RL #2506 (0.7.0)
    _add(
        f"nemo_rl@0.6.0:{_n}:importance_weight",
        _follows,
        _desc + ", times the detached weight π/π_gen (1 without old_logp), outside the value "
        "clamp; gradient of the clamped estimate times that fixed weight (NeMo-RL sets a "
        "weight that overflows its float to 0; klest keeps it).",
        uses_old=True,
        estimator=_est,
        gradient="as_written",
        weight="detached",
        clamp=20.0,
        value_clamp=10.0,
    )
    # 0.7.0: the loss always carries the score term exp(x - sg x); calculate_kl clamps the
    # product w·v, and a token whose input clamp binds gets no gradient at all
    _desc7 = (
        f"NeMo-RL 0.7.0 {_n}: ℓ clipped to [-20, 20], times the non-detached weight w "
        "({}), the product w·{} clipped to [-10, 10]; gradient of that expression, 0 "
        "(score term included) where either clamp binds."
    )
    _opts7: dict[str, Any] = dict(
        estimator=_est,
        gradient="as_written",
        weight="differentiable",
        clamp=20.0,
        value_clamp=10.0,
        clamp_weighted=True,
        clamp_stops_gradient=True,
    )
    _add(
        f"nemo_rl@0.7.0:{_n}",
        _follows_is + " where no clamp binds (0 where one does)",
        _desc7.format("exp(logp - sg(logp)) = 1", _n),
        **_opts7,
    )
    _add(
        f"nemo_rl@0.7.0:{_n}:importance_weight",
        _follows_is + " where no clamp binds (0 where one does)",
        _desc7.format("π/π_gen; exp(logp - sg(logp)) without old_logp", _n),
        uses_old=True,
        **_opts7,
    )

# ----------------------------------------------------------------------------------------- slime
_SLIME = {
    "k1": ("k1", _NOTHING, "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[ℓ])", None),
    "k2": ("k2", _REVERSE, "½E_π[ℓ²], not the KL (score + pathwise)", None),
    "k3": ("k3", _FORWARD.replace(" (zero where a clamp binds)", ""), "", None),
    "low_var_kl": ("k3", _FORWARD, "", 10.0),
}
for _n, (_est, _follows, _follows_w, _vc) in _SLIME.items():
    _follows_w = _follows_w or "reverse KL(π‖π_ref) (score + pathwise: ∇E_π[k3])"
    _clip = ", the result clipped to [-10, 10]" if _vc else ""
    _add(
        f"slime:{_n}",
        _follows,
        f"slime compute_approx_kl, kl_loss_type={_n!r}: {_est} (no clamp before the exp){_clip}; "
        "gradient of that expression.",
        estimator=_est,
        gradient="as_written",
        value_clamp=_vc,
    )
    _add(
        f"slime:{_n}:unbiased_kl",
        _follows_w + (" where the clamp does not bind" if _vc else ""),
        f"slime with --use-unbiased-kl, kl_loss_type={_n!r}: {_est} times the non-detached weight "
        f"π/π_old (exp(logp - sg(logp)) without old_logp){_clip.replace('result', 'product')}; "
        "gradient of that expression.",
        uses_old=True,
        estimator=_est,
        gradient="as_written",
        weight="differentiable",
        value_clamp=_vc,
        clamp_weighted=_vc is not None,
    )
