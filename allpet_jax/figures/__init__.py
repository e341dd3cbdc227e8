"""Figures that show what the project's methods do (one module per figure, each runnable with `python -m`)."""
