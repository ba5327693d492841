"""Low-rank hidden states: a per-layer principal-component basis, fitted once at the start of a capture.

A hidden state h (D,) is stored as its coefficients c = (h − μ)·B (P,) on the top-P principal
directions B (D, P) of the fit rows, μ their mean; μ + c·Bᵀ reconstructs h up to the variance the
basis leaves out. docs/FORMAT.md ("Low-rank hidden states") specifies the arrays and attributes.
"""

from __future__ import annotations

import numpy as np
import torch


class Moments:
    """Running first and second moments of hidden states in float64 (the covariance needs them exact)."""

    def __init__(self, width: int):
        self.count = 0
        self.total = torch.zeros(width, dtype=torch.float64)              # Σ h      (D,)
        self.outer = torch.zeros(width, width, dtype=torch.float64)       # Σ h hᵀ   (D, D)

    def add(self, hidden: torch.Tensor) -> None:
        """hidden (..., D): every position counts once."""
        h = hidden.detach().reshape(-1, hidden.shape[-1]).to("cpu", torch.float64)  # (N, D)
        self.count += h.shape[0]
        self.total += h.sum(0)
        self.outer += h.T @ h

    def fit(self, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(mean (D,) float32, basis (D, rank) float32 with orthonormal columns, variance kept on these rows).

        Columns are the eigenvectors of the covariance with the `rank` largest eigenvalues, largest first;
        each column's largest-magnitude entry is made positive so that a refit gives the same signs.
        """
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        covariance = (covariance + covariance.T) / 2  # exactly symmetric for eigh
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        basis = eigenvectors[:, -rank:].flip(-1)  # (D, P), largest variance first
        pivot = basis.abs().argmax(0)
        basis = basis * torch.sign(basis[pivot, torch.arange(rank)])
        total_variance = float(eigenvalues.clamp(min=0).sum())
        kept = float(eigenvalues[-rank:].clamp(min=0).sum()) / total_variance if total_variance > 0 else 1.0
        return mean.float().numpy(), basis.float().numpy(), kept


def project(hidden: torch.Tensor, mean: np.ndarray, basis: np.ndarray) -> torch.Tensor:
    """Coefficients (..., P) float32 of hidden states (..., D) on the basis."""
    mean_t = torch.as_tensor(mean, device=hidden.device)
    basis_t = torch.as_tensor(basis, device=hidden.device)
    return (hidden.float() - mean_t) @ basis_t


def reconstruct(coefficients: torch.Tensor, mean: np.ndarray, basis: np.ndarray) -> torch.Tensor:
    """Hidden states (..., D) float32 from coefficients (..., P): μ + c·Bᵀ."""
    basis_t = torch.as_tensor(basis, device=coefficients.device)
    return coefficients.float() @ basis_t.T + torch.as_tensor(mean, device=coefficients.device)


def energy(hidden: torch.Tensor, coefficients: torch.Tensor, mean: np.ndarray) -> tuple[float, float]:
    """(Σ‖c‖², Σ‖h − μ‖²) in float64: their ratio over a capture is the fraction of variance kept."""
    centred = hidden.double() - torch.as_tensor(mean, device=hidden.device).double()
    return float(coefficients.double().pow(2).sum()), float(centred.pow(2).sum())
