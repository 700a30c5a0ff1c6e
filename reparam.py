"""TPR's reparameterization encoder P_R = beta(P) + P (Eq. 12) and the beta networks of Table 3
(filled by the TPR issue)."""
