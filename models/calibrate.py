"""Calibration and operating points, fitted on validation logits only.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T`` chosen to
minimise the validation negative log-likelihood; a bias on the positive logit, folded into
the classifier, undoes the prior shift of a class-balanced loss. Neither changes the ranking.
Tier thresholds are then read off the calibrated validation scores of positive cases.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from models.bundle import Thresholds


class OperatingPoints(BaseModel):
    """Tier thresholds with the validation sensitivity/specificity each one achieves."""

    model_config = ConfigDict(frozen=True)

    thresholds: Thresholds
    critical_sensitivity: float
    critical_specificity: float
    elevated_sensitivity: float
    elevated_specificity: float


def balancing_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-class weights that give every class the same total weight in a mean loss."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return torch.as_tensor(counts.sum() / (num_classes * np.maximum(counts, 1.0)), dtype=torch.float64)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, balanced: bool = False) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``.

    Args:
        logits: ``(N, C)`` raw logits.
        labels: ``(N,)`` class indices.
        temperature: the divisor.
        balanced: weight the classes equally (the NLL under a uniform class prior).

    Returns:
        The mean NLL in nats.
    """
    scaled = torch.as_tensor(logits, dtype=torch.float64) / temperature
    weight = balancing_weights(labels, scaled.shape[1]) if balanced else None
    return float(
        torch.nn.functional.cross_entropy(scaled, torch.as_tensor(labels, dtype=torch.long), weight=weight)
    )


class Calibration(BaseModel):
    """``softmax((logits + bias on the positive logit) / temperature)``."""

    model_config = ConfigDict(frozen=True)

    temperature: float
    bias: float = 0.0


def fit_calibration(
    logits: np.ndarray, labels: np.ndarray, positive_index: int, fit_bias: bool = True, balanced: bool = False
) -> Calibration:
    """Fit the temperature (and a positive-logit bias) that minimise validation NLL (LBFGS).

    The bias undoes the prior shift of a class-balanced loss (logit adjustment, Menon et al.
    2021); it is folded into the classifier with :func:`fold_bias`, so a bundle still only
    carries a temperature. Neither changes the ranking of images.

    Args:
        logits: ``(N, C)`` validation logits.
        labels: ``(N,)`` validation class indices.
        positive_index: the column the bias is added to.
        fit_bias: ``False`` fits plain temperature scaling (Guo et al. 2017).
        balanced: weight the classes equally, so the probabilities are for a 1:1 prior
            rather than the validation set's prevalence.

    Returns:
        The fitted :class:`Calibration`; the identity if the optimiser fails to beat it.

    Raises:
        ValueError: if the inputs are empty or their lengths differ.
    """
    if len(logits) == 0 or len(logits) != len(labels):
        raise ValueError(f"need matching non-empty logits and labels, got {len(logits)} and {len(labels)}")
    x = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=fit_bias)
    column = torch.nn.functional.one_hot(torch.tensor(positive_index), x.shape[1]).double()
    weight = balancing_weights(labels, x.shape[1]) if balanced else None
    optimizer = torch.optim.LBFGS(
        [log_t, bias] if fit_bias else [log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy((x + bias * column) / log_t.exp(), y, weight=weight)
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    fitted = Calibration(temperature=float(log_t.detach().exp()), bias=float(bias.detach()))
    shifted = shift_logits(logits, positive_index, fitted.bias)
    worse = nll(shifted, labels, fitted.temperature, balanced) > nll(logits, labels, balanced=balanced)
    if not np.isfinite(fitted.temperature) or worse:
        return Calibration(temperature=1.0)
    return fitted


def shift_logits(logits: np.ndarray, positive_index: int, bias: float) -> np.ndarray:
    """A copy of ``logits`` with ``bias`` added to the positive column."""
    shifted = np.array(logits, dtype=np.float64)
    shifted[:, positive_index] += bias
    return shifted


def fold_bias(network: torch.nn.Module, positive_index: int, bias: float) -> None:
    """Add ``bias`` to the positive output of the network's classifier, in place.

    Args:
        network: a timm network (``get_classifier()`` is its final linear layer).
        positive_index: the output to shift.
        bias: the shift, from :func:`fit_calibration`.

    Raises:
        ValueError: if the classifier has no bias term.
    """
    classifier = network.get_classifier()  # type: ignore[operator]
    if getattr(classifier, "bias", None) is None:
        raise ValueError("the classifier has no bias to fold the calibration into")
    with torch.no_grad():
        classifier.bias[positive_index] += bias


RISK_BIN_EDGES = tuple(i / 10 for i in range(11))
"""Ten equal risk bins; monitoring compares live score distributions over the same edges."""


def risk_histogram(scores: np.ndarray) -> dict[str, list[float] | list[int]]:
    """Counts of calibrated scores per risk bin, as stored in a card's validation metrics.

    Args:
        scores: positive-class probabilities in ``[0, 1]``.

    Returns:
        ``{"edges": [0.0, 0.1, ..., 1.0], "counts": [10 ints]}`` (the last bin includes 1.0).
    """
    counts = np.histogram(np.asarray(scores, dtype=np.float64), np.asarray(RISK_BIN_EDGES))[0]
    return {"edges": list(RISK_BIN_EDGES), "counts": [int(c) for c in counts]}


def calibrated_scores(logits: np.ndarray, temperature: float, positive_index: int) -> np.ndarray:
    """``softmax(logits / T)[:, positive_index]``, as :meth:`models.bundle.Bundle.predict` does."""
    scaled = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return torch.softmax(scaled, dim=1)[:, positive_index].numpy()


def threshold_for_sensitivity(scores: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity (``score >= t`` is positive) is at least ``sensitivity``.

    Args:
        scores: positive-class probabilities.
        labels: 1 for positive, 0 for negative.
        sensitivity: the required fraction of positives at or above the threshold.

    Returns:
        The threshold (one of the positive scores).

    Raises:
        ValueError: if there is no positive case or ``sensitivity`` is outside ``(0, 1]``.
    """
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    positives = np.sort(scores[labels == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive case to set a threshold on")
    needed = int(np.ceil(sensitivity * len(positives)))
    return float(positives[needed - 1])


def operating_points(
    scores: np.ndarray,
    labels: np.ndarray,
    critical_sensitivity: float = 0.95,
    elevated_sensitivity: float = 0.99,
    population: str = "the patient-wise validation split",
) -> OperatingPoints:
    """Tier thresholds on validation scores: ``critical`` keeps sensitivity >= 0.95, ``elevated`` >= 0.99.

    Args:
        scores: calibrated positive-class probabilities on validation.
        labels: 1 for positive, 0 for negative.
        critical_sensitivity: required sensitivity at the critical threshold.
        elevated_sensitivity: required sensitivity at the (lower) elevated threshold.
        population: what the scores were measured on (for the rationale).

    Returns:
        The thresholds and what they achieve on validation.

    Raises:
        ValueError: if ``elevated_sensitivity < critical_sensitivity``.
    """
    if elevated_sensitivity < critical_sensitivity:
        raise ValueError("the elevated tier must be at least as sensitive as the critical one")
    critical = threshold_for_sensitivity(scores, labels, critical_sensitivity)
    elevated = min(threshold_for_sensitivity(scores, labels, elevated_sensitivity), critical)

    def rates(threshold: float) -> tuple[float, float]:
        predicted = scores >= threshold
        return float(predicted[labels == 1].mean()), float((~predicted[labels == 0]).mean())

    crit_sens, crit_spec = rates(critical)
    elev_sens, elev_spec = rates(elevated)
    rationale = (
        f"critical: highest validation threshold with sensitivity >= {critical_sensitivity:.2f} "
        f"(achieved {crit_sens:.3f}, specificity {crit_spec:.3f}); elevated: highest with "
        f"sensitivity >= {elevated_sensitivity:.2f} (achieved {elev_sens:.3f}, specificity {elev_spec:.3f}); "
        f"on calibrated scores of {population}"
    )
    return OperatingPoints(
        thresholds=Thresholds(critical=critical, elevated=elevated, rationale=rationale),
        critical_sensitivity=crit_sens,
        critical_specificity=crit_spec,
        elevated_sensitivity=elev_sens,
        elevated_specificity=elev_spec,
    )
