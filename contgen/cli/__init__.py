"""Entry-point logic behind train.py, sample.py, evaluate.py and cache_tokens.py (Hydra + Lightning live here)."""
