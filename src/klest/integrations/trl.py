r"""TRL's ``GRPOTrainer`` with klest's KL term: :class:`KlestGRPOTrainer` (TRL 1.16.0).

TRL has no hook for its KL term: ``GRPOTrainer._compute_loss`` adds ``beta * k3`` per token
inline. :class:`KlestGRPOTrainer` runs TRL's loss with β = 0 (the policy term, with every TRL
option: loss type, clipping, vLLM importance sampling, masks, entropy bonus), keeps the policy
log-probs that loss computed, and adds

.. math:: \beta \cdot \mathrm{norm}_{\text{loss\_type}}\big(\text{term}_{bt}\big)

where the per-token ``term`` is klest's and ``norm`` is exactly TRL's normaliser for its
``loss_type`` (grpo/sapo: mean over sequences of token means; bnpo: token mean; dr_grpo:
sum / (B · max_completion_length); dapo/cispo/vespo: sum / TRL's ``num_items_in_batch`` share;
luspo: mean of token sums), divided for gradient accumulation as TRL divides. Since the
normaliser is linear, the loss is TRL's own loss whenever the term is TRL's (tested: two steps of
``kl="trl@1.16.0:grpo"`` equal ``GRPOTrainer``'s losses and parameters to float32 round-off).

``kl=`` (the term; TRL's ``use_bias_correction_kl`` is ignored, with a warning when it is True and
``kl`` is not a ``:bias_correction`` preset):

- a dict of :func:`klest.rl.kl_per_token` options, default ``{"estimator": "k3", "gradient":
  "reverse_kl"}``: value k3 (unbiased for KL(π‖π_ref), low variance), gradient ℓ = log π/π_ref
  per token, whose expectation is ∇KL(π‖π_ref) per token (TRL's own k3-as-loss gradient,
  1 - π_ref/π, follows the forward KL(π_ref‖π)). With ``old_per_token_logps`` in the batch
  (``num_iterations > 1``) the term is weighted by the detached π/π_old;
- a :mod:`klest.rl.presets` name (``"trl@1.16.0:grpo"``, ``"trl@1.16.0:grpo:bias_correction"``,
  ``"verl@0.9.1:low_var_kl"``, ...): that framework's value and gradient;
- ``"full_kl"``: the exact per-position KL_t = KL(π(·|y_<t)‖π_ref(·|y_<t)) over the whole
  vocabulary (:func:`klest.logits.full_kl_from_hidden`, never forming [B, T, V]); its gradient is
  ∇KL_t at the sampled prefixes;
- ``"sequence_kl"`` (= ``"sequence_kl:full"``), ``"sequence_kl:mix"``, ``"sequence_kl:k1"``:
  :func:`klest.rl.sequence_kl`, whose gradient follows the *sequence* KL (k1: the reward-to-go
  of ℓ, what k1 in the reward gives with γ = 1 returns).

``"full_kl"``, ``"sequence_kl"`` and ``"sequence_kl:mix"`` need the reference's hidden states:
after TRL's generation step the trainer runs one forward of the reference backbone over the
generation batch (no logits: the [B, T, H] final hidden states are kept with the batch), so a
step costs one reference forward more than TRL's (whatever ``num_iterations``); the output layer
is applied inside :func:`klest.logits.full_kl_from_hidden`. Models whose logits are not
``hidden @ Wᵀ / temperature`` (an output bias, logit soft-capping or scaling), PEFT policies
(no separate reference model) and vision-language inputs are refused for these options.

``kl_target=`` (a number, or a :class:`klest.rl.KLController`): β follows a target KL with the
controller (a number means ``KLController("adaptive_se", init=args.beta, target=kl_target)``);
it is updated once per optimizer step from that step's ``kl`` and ``kl_stderr``, with
``n_steps`` = the number of sequences in the step (verl's and OpenRLHF's convention); its state
goes into checkpoints (``klest_kl_controller.json``).

Logged (same keys as TRL where TRL has one): ``kl``, the mean of the term's per-token value over
the valid tokens (TRL's ``kl`` when the value is k3); ``kl_stderr``, its standard error with the
sequences as independent units (ratio estimator: √(B/(B-1)·Σ_b (S_b - kl·n_b)²)/Σ_b n_b, with
S_b, n_b the sum of values and the token count of sequence b; +inf with a single sequence);
``beta`` with a controller; and, when the batch holds the sampler's log-probs (vLLM:
``sampling_per_token_logps``), the sampler-trainer mismatch diagnostics of
:func:`klest.rl.mismatch` as ``mismatch/<key>`` (tokens the sampler could not score left out).

``use_liger_kernel=True`` is refused before anything is loaded (Liger replaces the loss this
trainer extends). The trainer draws nothing from the global random generators: a run is
reproducible seed for seed, and with a preset reproducing TRL it consumes the same random
numbers as ``GRPOTrainer``.

Importing this module imports TRL (``pip install 'klest[trl]'``); ``import klest`` and
``import klest.integrations`` do not.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..errors import KlestError
from ..logits import full_kl_from_hidden
from ..rl import presets as _presets
from ..rl.controller import KLController
from ..rl.penalty import kl_per_token
from ..rl.sequence import sequence_kl

try:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import GRPOTrainer
except ImportError as _e:  # pragma: no cover - exercised only without TRL
    raise ImportError("klest.integrations.trl needs TRL 1.16: pip install 'klest[trl]'") from _e

# the sampler-mismatch diagnostics, when this klest has them (klest.rl.mismatch)
_mismatch: Callable[..., Any] | None
try:
    from ..rl.mismatch import mismatch as _mismatch
except ImportError:  # pragma: no cover - depends on the klest version
    _mismatch = None

__all__ = ["LOGIT_OPTIONS", "KLTerm", "KlestGRPOTrainer", "parse_kl"]

LogitOption = Literal[
    "full_kl", "sequence_kl", "sequence_kl:full", "sequence_kl:mix", "sequence_kl:k1"
]
LOGIT_OPTIONS: tuple[LogitOption, ...] = (
    "full_kl",
    "sequence_kl",
    "sequence_kl:full",
    "sequence_kl:mix",
    "sequence_kl:k1",
)
DEFAULT_KL: dict[str, Any] = {"estimator": "k3", "gradient": "reverse_kl"}
# kl_per_token's options a dict may set (the inputs come from the batch, the reduction from TRL)
_OPTION_NAMES = tuple(
    p
    for p in inspect.signature(kl_per_token).parameters
    if p not in ("logp", "ref_logp", "old_logp", "mask")
)
_CHECKPOINT_FILE = "klest_kl_controller.json"


@dataclass(frozen=True)
class KLTerm:
    """What ``kl=`` asked for: ``kind`` ``"token"`` (a preset or kl_per_token options),
    ``"full_kl"`` or ``"sequence_kl"`` (with ``sequence_estimator``)."""

    name: str
    kind: Literal["token", "full_kl", "sequence_kl"]
    preset: _presets.Preset | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sequence_estimator: Literal["full", "mix", "k1"] | None = None

    @property
    def needs_reference_hidden(self) -> bool:
        """Whether the term needs the reference's full next-token distributions."""
        return self.kind == "full_kl" or self.sequence_estimator in ("full", "mix")

    @property
    def bias_correction(self) -> bool:
        """Whether the term is one of TRL's ``use_bias_correction_kl`` presets."""
        return self.preset is not None and ":bias_correction" in self.preset.name

    def per_token(
        self,
        logp: torch.Tensor,
        ref_logp: torch.Tensor | None,
        old_logp: torch.Tensor | None,
        mask: torch.Tensor,
        full: torch.Tensor | None,
    ) -> torch.Tensor:
        """The per-token term [B, T] (value and gradient) from the batch's log-probs and, for the
        logit options, the per-position full KL ``full``."""
        if self.kind == "full_kl":
            assert full is not None
            return full
        if self.kind == "sequence_kl":
            assert self.sequence_estimator is not None
            return sequence_kl(
                logp,
                ref_logp if self.sequence_estimator != "full" else None,
                kl=full,
                old_logp=old_logp,
                mask=mask,
                estimator=self.sequence_estimator,
            ).terms
        assert ref_logp is not None
        if self.preset is not None:
            return self.preset(logp, ref_logp, old_logp=old_logp, mask=mask)
        return kl_per_token(logp, ref_logp, old_logp=old_logp, mask=mask, **self.options)


def parse_kl(kl: Any) -> KLTerm:
    """``kl=`` of :class:`KlestGRPOTrainer` as a :class:`KLTerm` (checked, nothing computed).

    >>> from klest.integrations.trl import parse_kl
    >>> parse_kl("trl:grpo").preset.name, parse_kl("sequence_kl").needs_reference_hidden
    ('trl@1.16.0:grpo', True)
    """
    if kl is None:
        kl = dict(DEFAULT_KL)
    if isinstance(kl, dict):
        unknown = sorted(set(kl) - set(_OPTION_NAMES))
        if unknown:
            raise KlestError(
                f"unknown klest.rl.kl_per_token option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(_OPTION_NAMES)} (the reduction is TRL's loss_type)",
                argument="kl",
            )
        options = {**DEFAULT_KL, **kl}
        try:  # the options' own checks, on a one-token batch
            x = torch.zeros(1, 1)
            kl_per_token(x, x, **options)
        except KlestError as e:
            raise KlestError(f"bad kl_per_token options: {e}", argument="kl") from None
        return KLTerm(f"klest:{options}", "token", options=options)
    if not isinstance(kl, str):
        raise KlestError(
            "must be a klest.rl preset name, a dict of klest.rl.kl_per_token options, or one of "
            + ", ".join(map(repr, LOGIT_OPTIONS)),
            argument="kl",
            value=kl,
        )
    if kl == "full_kl":
        return KLTerm(kl, "full_kl")
    if kl.startswith("sequence_kl"):
        est = kl.partition(":")[2] or "full"
        if est not in ("full", "mix", "k1"):
            raise KlestError(
                f"unknown {kl!r}; known: {', '.join(map(repr, LOGIT_OPTIONS))}", argument="kl"
            )
        return KLTerm(kl, "sequence_kl", sequence_estimator=est)  # type: ignore[arg-type]
    try:
        preset = _presets.get(kl)
    except KlestError as e:
        raise KlestError(
            f"{e} (or a dict of kl_per_token options, or one of {', '.join(LOGIT_OPTIONS)})",
            argument="kl",
        ) from None
    return KLTerm(preset.name, "token", preset=preset)


def _trainer_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The GRPOConfig passed to GRPOTrainer (None if not given)."""
    try:
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
    except TypeError as e:
        raise KlestError(f"GRPOTrainer's arguments do not bind: {e}") from None
    return bound.arguments.get("args")


def _stats(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-batch sums for the mean and its sequence-level standard error (float64):
    [Σ S_b, Σ n_b, Σ S_b², Σ S_b n_b, Σ n_b², B] with S_b the sum of row b's valid values."""
    v = values.detach().to(torch.float64)
    m = mask.to(torch.bool)
    v = torch.where(m, v, torch.zeros((), dtype=v.dtype, device=v.device))
    s = v.sum(-1)
    n = m.sum(-1).to(torch.float64)
    rows = torch.full((), float(v.shape[0]), dtype=torch.float64, device=v.device)
    return torch.stack([s.sum(), n.sum(), (s * s).sum(), (s * n).sum(), (n * n).sum(), rows])


def _mean_and_stderr(t: torch.Tensor) -> tuple[float, float] | None:
    """(mean, standard error) from :func:`_stats` totals; None without valid tokens."""
    ss, nn, s2, sn, n2, b = (float(x) for x in t)
    if nn <= 0:
        return None
    mean = ss / nn
    if not math.isfinite(mean) or b < 2:
        return mean, math.inf
    resid = max(s2 - 2.0 * mean * sn + mean * mean * n2, 0.0)  # Σ_b (S_b - mean·n_b)²
    return mean, math.sqrt(b / (b - 1.0) * resid) / nn


def _plain_logits(model: Any, which: str) -> None:
    """Refuse models whose logits are not hidden @ Wᵀ (the full-KL options assume that)."""
    cfg = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    for attr in (
        "final_logit_softcapping",
        "logit_scale",
        "output_multiplier",
        "lm_head_multiplier",
    ):
        v = getattr(cfg, attr, None)
        if v is not None and v != 1.0:
            raise KlestError(
                f"the {which} model scales or caps its logits ({attr}={v}); the full-KL options "
                "assume logits = hidden @ weightᵀ",
                argument="kl",
            )
    if getattr(cfg, "logits_scaling", None) not in (None, 1.0):
        raise KlestError(f"the {which} model scales its logits (logits_scaling)", argument="kl")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise KlestError(
            f"the {which} model's output layer has a bias (or none was found); the full-KL "
            "options assume logits = hidden @ weightᵀ",
            argument="kl",
        )


class KlestGRPOTrainer(GRPOTrainer):
    """A drop-in ``trl.GRPOTrainer`` whose KL term is klest's (module docstring).

    Takes GRPOTrainer's arguments, plus:

    Args:
        kl: the KL term: a dict of :func:`klest.rl.kl_per_token` options (default k3 value with
            the reverse-KL gradient), a :mod:`klest.rl.presets` name, or one of
            ``LOGIT_OPTIONS`` (``"full_kl"``, ``"sequence_kl"``, ...).
        kl_target: None (β = ``args.beta`` throughout), a target KL (per token, in the units of
            the logged ``kl``) for ``KLController("adaptive_se", init=args.beta, ...)``, or a
            :class:`klest.rl.KLController`.

    ``args.beta`` = 0 means no KL term and no reference model, as in TRL.
    """

    def __init__(self, *args: Any, kl: Any = None, kl_target: Any = None, **kwargs: Any) -> None:
        term = parse_kl(kl)
        config = _trainer_args(args, kwargs)
        if config is not None and getattr(config, "use_liger_kernel", False):
            raise KlestError(
                "use_liger_kernel=True: Liger's kernels compute TRL's own loss and KL, which "
                "KlestGRPOTrainer replaces; set use_liger_kernel=False",
                argument="args",
            )
        beta = float(getattr(config, "beta", 0.0)) if config is not None else 0.0
        controller: KLController | None
        if kl_target is None:
            controller = None
        elif isinstance(kl_target, KLController):
            controller = kl_target
        else:
            if beta == 0.0:
                raise KlestError(
                    "a KL target needs args.beta > 0 (its initial value; TRL loads the "
                    "reference model only when beta != 0)",
                    argument="kl_target",
                )
            controller = KLController("adaptive_se", init=beta, target=kl_target)
        if controller is not None and beta == 0.0:
            raise KlestError(
                "a KL controller needs args.beta != 0 (TRL loads the reference model only then)",
                argument="kl_target",
            )
        if (
            config is not None
            and beta != 0.0
            and getattr(config, "use_bias_correction_kl", False)
            and not term.bias_correction
        ):
            warnings.warn(
                f"KlestGRPOTrainer: use_bias_correction_kl=True is ignored; kl={term.name!r} "
                "alone defines the KL term (kl='trl@1.16.0:grpo:bias_correction' is TRL's "
                "bias-corrected k3)",
                UserWarning,
                stacklevel=2,
            )
        super().__init__(*args, **kwargs)
        self.klest_term = term
        self.kl_controller = controller
        if controller is not None:
            self.beta = controller.value
        self.klest_reference_forwards = 0  # reference forwards run by klest (logit options)
        self._klest_capture = False
        self._klest_logps: torch.Tensor | None = None
        self._klest_hidden: list[torch.Tensor] = []
        self._klest_window: torch.Tensor | None = None
        self._klest_hook = None
        if term.needs_reference_hidden and self.beta != 0.0:
            if self.ref_model is None:
                raise KlestError(
                    f"kl={term.name!r} needs a separate reference model; with PEFT TRL has none",
                    argument="kl",
                )
            if getattr(self, "_is_vlm", False):
                raise KlestError(
                    f"kl={term.name!r} is not supported for vision-language models", argument="kl"
                )
            policy = self.accelerator.unwrap_model(self.model)
            _plain_logits(policy, "policy")
            _plain_logits(self.accelerator.unwrap_model(self.ref_model), "reference")
            self._klest_hook = policy.base_model.register_forward_hook(self._klest_keep_hidden)

    def _klest_mode(self) -> str:
        return "train" if getattr(self.model, "training", False) else "eval"

    # ------------------------------------------------------------------------------ capture
    def _klest_keep_hidden(self, module: Any, inputs: Any, output: Any) -> None:
        if self._klest_capture:
            self._klest_hidden.append(output.last_hidden_state)

    def _get_per_token_logps_and_entropies(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._klest_capture:
            self._klest_logps = out[0]
        return out

    def _klest_reference_hidden(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's final hidden states at the positions that predict each completion
        token [B, K, H], one no-grad forward of its backbone over the generation batch."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        k = batch["completion_ids"].size(1)
        mode = self._klest_mode()
        size = (
            self.args.per_device_train_batch_size
            if mode == "train"
            else self.args.per_device_eval_batch_size
        )
        backbone = self.accelerator.unwrap_model(self.ref_model).base_model
        parts = []
        with torch.no_grad(), self.accelerator.autocast():
            for start in range(0, ids.size(0), size):
                out = backbone(
                    input_ids=ids[start : start + size],
                    attention_mask=attn[start : start + size],
                    use_cache=False,
                )
                parts.append(out.last_hidden_state[:, -k - 1 : -1])
        self.klest_reference_forwards += 1
        return torch.cat(parts, dim=0)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        if self.klest_term.needs_reference_hidden and self.beta != 0.0:
            out["klest_ref_hidden"] = self._klest_reference_hidden(out)
        return out

    # --------------------------------------------------------------------------------- loss
    def _klest_normalise(self, term: torch.Tensor, mask: torch.Tensor, inputs: Any) -> torch.Tensor:
        """TRL 1.16.0's reduction of a per-token loss for ``self.loss_type`` (see
        ``GRPOTrainer._compute_loss``), gradient-accumulation scaling included."""
        mode = self._klest_mode()
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        x = term * mask
        lt = self.loss_type
        if lt in ("grpo", "sapo"):
            return (x.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accum
        if lt == "bnpo":
            return x.sum() / mask.sum().clamp(min=1.0) / accum
        if lt == "dr_grpo":
            length: Any = self.max_completion_length
            return x.sum() / (x.size(0) * length) / accum
        if lt in ("cispo", "dapo", "vespo"):
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                config: Any = self.args
                norm = norm * accum / config.steps_per_generation
            return x.sum() / norm
        if lt == "luspo":
            return x.sum(-1).mean() / accum
        raise KlestError(f"unknown TRL loss_type {lt!r}", argument="args")

    def _compute_loss(self, model: Any, inputs: Any) -> torch.Tensor:
        if self.beta == 0.0:
            return super()._compute_loss(model, inputs)
        beta = self.beta
        self.beta, self._klest_capture = 0.0, True
        self._klest_logps, self._klest_hidden = None, []
        try:
            loss = super()._compute_loss(model, inputs)  # TRL's policy loss, KL off
        finally:
            self.beta, self._klest_capture = beta, False
        logp = self._klest_logps
        assert logp is not None
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        full = None
        if self.klest_term.needs_reference_hidden:
            policy = self.accelerator.unwrap_model(model)
            k = logp.size(1)
            hidden = torch.cat(self._klest_hidden, dim=0)[:, -k - 1 : -1]
            ref = self.accelerator.unwrap_model(self.ref_model)
            full = full_kl_from_hidden(
                hidden,
                policy.get_output_embeddings().weight,
                inputs["klest_ref_hidden"],
                ref.get_output_embeddings().weight.detach(),
                mask,
                temperature=self.temperature,
            )
        self._klest_hidden = []
        term = self.klest_term.per_token(
            logp,
            inputs.get("ref_per_token_logps"),
            inputs.get("old_per_token_logps"),
            mask,
            full,
        )
        loss = loss + beta * self._klest_normalise(term, mask, inputs).to(loss.dtype)
        self._klest_log(term, mask, inputs)
        return loss

    def _klest_log(self, term: torch.Tensor, mask: torch.Tensor, inputs: Any) -> None:
        mode = self._klest_mode()
        local = _stats(term, mask)
        totals = self.accelerator.reduce(local, reduction="sum")
        got = _mean_and_stderr(totals)
        if got is not None:
            self._metrics[mode]["kl"].append(got[0])
            self._metrics[mode]["kl_stderr"].append(got[1])
        if _mismatch is not None and "sampling_per_token_logps" in inputs:
            self._klest_log_mismatch(inputs, mask, mode)
        if self.kl_controller is None or mode != "train":
            return
        self._klest_window = totals if self._klest_window is None else self._klest_window + totals
        if self.accelerator.sync_gradients:  # the optimizer step's last micro-batch
            window = _mean_and_stderr(self._klest_window)
            if window is not None:
                self.kl_controller.update(
                    window[0], kl_stderr=window[1], n_steps=int(self._klest_window[5])
                )
            self.beta = self.kl_controller.value
            self._klest_window = None
            self._metrics[mode]["beta"].append(self.beta)

    def _klest_log_mismatch(self, inputs: Any, mask: torch.Tensor, mode: str) -> None:
        """Sampler-trainer mismatch diagnostics (:func:`klest.rl.mismatch`) of the trainer's
        log-probs against the sampler's, logged as ``mismatch/<key>``."""
        logp = self._klest_logps
        assert logp is not None and _mismatch is not None
        sampled = inputs["sampling_per_token_logps"]
        # tokens the sampler could not score carry NaN in TRL: left out, as TRL leaves them out
        valid = mask.to(torch.bool) & torch.isfinite(sampled) & torch.isfinite(logp.detach())
        report = _mismatch(logp.detach(), sampled, valid)
        for key, value in report.as_dict(prefix="mismatch/").items():
            self._metrics[mode][key].append(value)

    # --------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.kl_controller is not None and self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial),
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}",
            )
            with open(os.path.join(folder, _CHECKPOINT_FILE), "w") as f:
                json.dump(self.kl_controller.state_dict(), f)

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.kl_controller is not None and checkpoint is not None:
            path = os.path.join(checkpoint, _CHECKPOINT_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.kl_controller.load_state_dict(json.load(f))
                self.beta = self.kl_controller.value
