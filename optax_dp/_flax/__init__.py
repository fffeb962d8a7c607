"""The framework adapters, one per Flax API: Linen (`_linen`) and NNX
(`_nnx`). Everything below them is framework-neutral.
"""
