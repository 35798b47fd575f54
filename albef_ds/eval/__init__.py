"""Evaluation: recall metrics, the retrieval protocol, the shapes probe; each task's evaluator."""
