"""Training engine for both methods (filled by the engine issue)."""
