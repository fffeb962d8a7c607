"""Lifecycle: the privacy budget (`_budget`), accumulation (`_accumulate`),
parameter averaging (`_averaging`) and augmentation multiplicity
(`_augmentation`).
"""
