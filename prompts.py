"""Prompt modules of both papers (filled by the TPR and BiEfficient issues).

TPR (Electronics 2024): temporal prompts C, G, I of Eq. (8)-(11), prompts joining the frozen attention
(Eq. 13-14), word-guided frame weighting (Eq. 6-7).
BiEfficient (ACCV 2024): Pre-Prompt with Meta-Net (Eq. 5-6), Post-Prompt (Eq. 7), Word-Guided Visual Prompt
(Eq. 8-9).
"""
