"""Exactly once: one writer per output (lease), the commit protocol (commit, parts), run records, and what a re-run
redoes (inspection, resume decision, retraction, resume)."""
