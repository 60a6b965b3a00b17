"""Public face of the scoring stage."""

from ._score import PROB_PREFIX, Predictor, ScoreConfig, decode_batch, format_summary, output_schema, recover, run_scoring

__all__ = ["PROB_PREFIX", "Predictor", "ScoreConfig", "decode_batch", "format_summary", "output_schema", "recover", "run_scoring"]
