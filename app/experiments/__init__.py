"""Online experiments: assignment (layers, hashing, kill switches), per-user metrics,
statistics, guardrails and the ship / keep running / roll back decision. No Ray here."""
