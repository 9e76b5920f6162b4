"""The paper's per-pixel ridge regression baseline: height from one pixel's 64 numbers."""

from __future__ import annotations

import numpy as np


class RidgeBaseline:
    """Closed-form ridge on standardised embeddings with an unpenalised intercept."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def fit(self, features: np.ndarray, target: np.ndarray) -> "RidgeBaseline":
        """features (n, 64), target (n,), finite rows only."""
        x = features.astype(np.float64)
        self.mean, self.scale = x.mean(axis=0), x.std(axis=0) + 1e-12
        z = (x - self.mean) / self.scale
        self.intercept = float(target.mean())
        gram = z.T @ z + self.alpha * np.eye(z.shape[1])
        self.coef = np.linalg.solve(gram, z.T @ (target - self.intercept))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (features.astype(np.float64) - self.mean) / self.scale
        return (z @ self.coef + self.intercept).astype(np.float32)


def pixels(embeddings: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64) features and (n,) heights of the masked pixels of a (64, h, w) block."""
    return embeddings[:, mask].T, reference[mask]
