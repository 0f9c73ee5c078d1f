"""Preference objectives: DPO (and its IPO and hinge variants), ORPO and SimPO, for the shared training loop.

Every method scores an answer by the log-probability the model gives its completion tokens (the prompt is masked
exactly as in supervised fine-tuning), and contrasts the chosen answer of a pair with the rejected one:

  DPO     (Rafailov et al., 2023)  -log sigmoid(h), h = beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]
          with label smoothing e (conservative DPO): -(1 - e) log sigmoid(h) - e log sigmoid(-h)
  IPO     (Azar et al., 2023)      (g - 1 / (2 beta))^2, g = the same log-ratio difference with each log-ratio divided by
          the answer's token count (the IPO authors' correction: averaged, not summed, log-likelihoods)
  hinge   (SLiC, Zhao et al., 2023)  max(0, 1 - h)
  ORPO    (Hong et al., 2024)      -mean log pi(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)),
          odds(y) = P(y) / (1 - P(y)), P(y) = exp(mean token log-prob of y)
  SimPO   (Meng et al., 2024)      -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma)

The unit of the loop's normaliser is one pair: `loss_sum` returns the summed per-pair losses and summed per-pair
metrics, and the loop divides both by the number of pairs in the global batch.

DPO's reference model is either the policy itself with its LoRA adapters switched off (no second copy of the
weights), or, for full fine-tuning, a frozen copy of the starting weights. Its log-probs are computed per
micro-batch, under no_grad, before the policy's forward so the two never hold activations at the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litft.adapters.lora import adapters_disabled
from litft.errors import ConfigError
from litft.training.loss import IGNORE_INDEX, find_trained_positions

Batch = dict[str, Any]
PreferencePair = dict[str, Any]  # {"chosen": Sample, "rejected": Sample}
Metrics = dict[str, torch.Tensor]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


# ----------------------------------------------------------------------------------------------------------------
# Sequence log-probabilities
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SequenceLogProbs:
    """Per pair (B,): the summed log-probability of the completion tokens of each answer, and their count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens


def sequence_log_probs(model: nn.Module, batch: Batch) -> SequenceLogProbs:
    """Runs the concatenated batch (all chosen answers, then all rejected ones) through `model`, a
    `CausalLMObjective` (possibly Fabric-wrapped), and sums each sequence's log-probs over its trained tokens."""
    token_losses = model(
        batch["input_ids"],
        batch["targets"],
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
        reduction="none",
        trained_positions=batch.get("trained_positions"),
    )  # (2B, T): -log p(target), 0 where not trained
    log_probs = -token_losses.sum(dim=-1)  # (2B,)
    tokens = (batch["targets"] != IGNORE_INDEX).sum(dim=-1)  # (2B,)
    pairs = log_probs.shape[0] // 2
    return SequenceLogProbs(log_probs[:pairs], log_probs[pairs:], tokens[:pairs], tokens[pairs:])


# ----------------------------------------------------------------------------------------------------------------
# Losses: each returns per-pair losses (B,) and per-pair metrics (B,) (detached)
# ----------------------------------------------------------------------------------------------------------------


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with the preference label flipped with probability `label_smoothing`."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy: SequenceLogProbs) -> Metrics:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margin": chosen_rewards - rejected_rewards,
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy.chosen.detach(),
        "logps/rejected": policy.rejected.detach(),
    }


def dpo_loss(
    policy: SequenceLogProbs, reference: SequenceLogProbs, beta: float, loss_type: str, label_smoothing: float
) -> tuple[torch.Tensor, Metrics]:
    """DPO and its IPO / hinge variants. The rewards are DPO's implicit rewards beta * log(pi / ref) of each answer."""
    chosen_log_ratio = policy.chosen - reference.chosen
    rejected_log_ratio = policy.rejected - reference.rejected
    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * (chosen_log_ratio - rejected_log_ratio), label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * (chosen_log_ratio - rejected_log_ratio))
    elif loss_type == "ipo":
        averaged = chosen_log_ratio / policy.chosen_tokens - rejected_log_ratio / policy.rejected_tokens
        losses = (averaged - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, reward_metrics(beta * chosen_log_ratio, beta * rejected_log_ratio, policy)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler, 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# The mean token log-prob is kept below this, so an answer the model is certain of has finite odds.
_MAX_MEAN_LOG_PROB = -1e-6


def log_odds(mean_log_prob: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) with log P = `mean_log_prob`."""
    mean_log_prob = mean_log_prob.clamp(max=_MAX_MEAN_LOG_PROB)
    return mean_log_prob - log1mexp(mean_log_prob)


def orpo_loss(policy: SequenceLogProbs, odds_ratio_weight: float) -> tuple[torch.Tensor, Metrics]:
    """ORPO: the chosen answer's mean token NLL plus the weighted odds-ratio term. The rewards are each answer's
    log-odds, so the margin is the log odds ratio."""
    chosen_log_odds = log_odds(policy.chosen_mean)
    rejected_log_odds = log_odds(policy.rejected_mean)
    nll = -policy.chosen_mean
    losses = nll - odds_ratio_weight * F.logsigmoid(chosen_log_odds - rejected_log_odds)
    metrics = reward_metrics(chosen_log_odds, rejected_log_odds, policy)
    metrics["nll"] = nll.detach()
    return losses, metrics


def simpo_loss(
    policy: SequenceLogProbs, beta: float, gamma: float, label_smoothing: float
) -> tuple[torch.Tensor, Metrics]:
    """SimPO: the length-normalised reward beta * mean token log-prob, with a target margin gamma."""
    chosen_rewards = beta * policy.chosen_mean
    rejected_rewards = beta * policy.rejected_mean
    losses = smoothed_sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return losses, reward_metrics(chosen_rewards, rejected_rewards, policy)


# ----------------------------------------------------------------------------------------------------------------
# Configuration (`--dpo.*`, `--orpo.*`, `--simpo.*`)
# ----------------------------------------------------------------------------------------------------------------


def _check_label_smoothing(flag: str, value: float) -> None:
    if not 0.0 <= value < 0.5:
        raise ConfigError(f"{flag} {value}: must be at least 0 and below 0.5 (the assumed rate of flipped labels)")


@dataclass
class DPOConfig:
    """Direct Preference Optimization.

    Args:
        beta: Strength of the pull toward the reference model (the KL penalty); typically 0.01 to 0.5. For
            `ipo` it is the regularisation tau: the target log-ratio margin is 1 / (2 beta).
        loss_type: sigmoid (DPO), ipo (IPO, on per-token averaged log-ratios) or hinge (SLiC).
        label_smoothing: The assumed fraction of pairs whose preference is flipped (conservative DPO, sigmoid only).
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    needs_reference = True

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"--dpo.beta {self.beta}: must be positive")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"--dpo.loss_type {self.loss_type!r}: choose one of {', '.join(DPO_LOSS_TYPES)}")
        _check_label_smoothing("--dpo.label_smoothing", self.label_smoothing)
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"--dpo.label_smoothing applies to --dpo.loss_type sigmoid, not {self.loss_type}")

    def loss(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None) -> tuple[torch.Tensor, Metrics]:
        assert reference is not None, "DPO compares the policy with a reference model"
        return dpo_loss(policy, reference, self.beta, self.loss_type, self.label_smoothing)


@dataclass
class ORPOConfig:
    """Odds Ratio Preference Optimization: supervised fine-tuning on the chosen answers plus an odds-ratio penalty
    on the rejected ones, with no reference model.

    Args:
        odds_ratio_weight: Weight lambda of the odds-ratio term relative to the chosen answers' NLL (the paper
            uses 0.1 to 0.25).
    """

    odds_ratio_weight: float = 0.1

    needs_reference = False

    def validate(self) -> None:
        if not self.odds_ratio_weight > 0:
            raise ConfigError(f"--orpo.odds_ratio_weight {self.odds_ratio_weight}: must be positive")

    def loss(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None) -> tuple[torch.Tensor, Metrics]:
        return orpo_loss(policy, self.odds_ratio_weight)


@dataclass
class SimPOConfig:
    """Simple Preference Optimization: a length-normalised, reference-free DPO with a target reward margin.

    Args:
        beta: Scale of the reward beta * (mean token log-prob of the answer); the paper uses 2.0 to 10.
        gamma: Target margin between the chosen and the rejected reward; the paper uses gamma / beta of 0.3 to 0.8.
        label_smoothing: The assumed fraction of pairs whose preference is flipped.
    """

    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    needs_reference = False

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"--simpo.beta {self.beta}: must be positive")
        if self.gamma < 0:
            raise ConfigError(f"--simpo.gamma {self.gamma}: must be at least 0")
        _check_label_smoothing("--simpo.label_smoothing", self.label_smoothing)

    def loss(self, policy: SequenceLogProbs, reference: SequenceLogProbs | None) -> tuple[torch.Tensor, Metrics]:
        return simpo_loss(policy, self.beta, self.gamma, self.label_smoothing)


PreferenceConfig = DPOConfig | ORPOConfig | SimPOConfig


# ----------------------------------------------------------------------------------------------------------------
# Reference models
# ----------------------------------------------------------------------------------------------------------------

Reference = Callable[[nn.Module, Batch], SequenceLogProbs]  # (policy, batch) -> the reference's log-probs


def base_model_reference(policy: nn.Module, batch: Batch) -> SequenceLogProbs:
    """The reference of adapter training: the policy with its adapters switched off."""
    with torch.no_grad(), adapters_disabled(policy):
        return sequence_log_probs(policy, batch)


class FrozenReference:
    """The reference of full fine-tuning: a frozen copy of the starting model (a `CausalLMObjective`), run under
    the policy's precision context (`autocast`) since it is not wrapped by Fabric itself."""

    def __init__(self, model: nn.Module, autocast: Callable[[], AbstractContextManager[Any]]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.autocast = autocast

    def __call__(self, policy: nn.Module, batch: Batch) -> SequenceLogProbs:
        with torch.no_grad(), self.autocast():
            return sequence_log_probs(self.model, batch)


# ----------------------------------------------------------------------------------------------------------------
# The objective the training loop runs
# ----------------------------------------------------------------------------------------------------------------


class PreferenceObjective:
    """One row is one pair. A micro-batch of B pairs is one padded batch of 2B sequences (every chosen answer,
    then every rejected one), so both answers of a pair go through the model in the same forward pass."""

    def __init__(self, config: PreferenceConfig, pad_id: int, reference: Reference | None = None) -> None:
        if config.needs_reference and reference is None:
            raise ValueError(f"{type(config).__name__} needs a reference model")
        self.config = config
        self.pad_id = pad_id
        self.reference = reference

    def collate(self, rows: list[PreferencePair]) -> Batch:
        from litft.data import collate

        sequences = [[pair["chosen"]] for pair in rows] + [[pair["rejected"]] for pair in rows]
        batch = collate(sequences, pad_id=self.pad_id)
        batch["trained_positions"] = find_trained_positions(batch["targets"])
        batch["num_pairs"] = torch.tensor(len(rows))
        batch["num_tokens"] = sum(len(pair["chosen"]["input_ids"]) + len(pair["rejected"]["input_ids"]) for pair in rows)
        return batch

    @staticmethod
    def row_length(row: PreferencePair) -> int:
        # A pair pads to its longer answer.
        return max(len(row["chosen"]["input_ids"]), len(row["rejected"]["input_ids"]))

    @staticmethod
    def count(batch: Batch) -> torch.Tensor:
        return batch["num_pairs"]

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        reference = self.reference(model, batch) if self.config.needs_reference else None
        policy = sequence_log_probs(model, batch)
        losses, metrics = self.config.loss(policy, reference)
        return losses.sum(), {name: value.sum() for name, value in metrics.items()}

    @staticmethod
    def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
        return {}  # rewards and their accuracy are already averages over pairs

    @staticmethod
    def summary(metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['loss']:.4f}, reward accuracy {metrics['rewards/accuracy']:.3f}, "
            f"margin {metrics['rewards/margin']:.4f}"
        )
