"""Build a deployable engine from model.pt and stream frames through it (issue 3)."""
