"""Evaluation: single/multi-view, zero-shot, few-shot, own video (filled by the engine issue)."""
