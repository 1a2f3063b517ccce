"""Independent float64 numpy references shared by the similarity tests (n x n Gram-matrix formulas)."""

import numpy as np


def ref_linear_cka(X, Y):
    """Linear CKA from doubly centred Gram matrices: <HKH, HLH>_F / (||HKH||_F ||HLH||_F)."""
    n = len(X)
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))


def ref_u_center(K):
    """U-centring of a Gram matrix (Kornblith et al. 2019, center_gram(unbiased=True)); zero diagonal."""
    n = K.shape[0]
    K = K.copy()
    np.fill_diagonal(K, 0)
    means = np.sum(K, 0) / (n - 2)
    means -= np.sum(means) / (2 * (n - 1))
    K -= means[:, None] + means[None, :]
    np.fill_diagonal(K, 0)
    return K
