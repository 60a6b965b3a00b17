"""Self-contained static HTML review reports of scoring outputs, training runs and searches."""
