"""Noise and aggregation: the noise sources (`_noise`, `_correlated`), the
release and its ledger (`_release`) and `dp_aggregate` (`_aggregate`).
"""
