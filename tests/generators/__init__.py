"""Generators of hostile and odd inputs for the tests (and the benchmarks that reuse them); no test here."""
