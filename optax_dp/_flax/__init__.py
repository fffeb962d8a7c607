"""The framework adapters, one pair per Flax API: Linen (`_linen`, the model
entry; `_linen_layers`, the book-keeping of its layers) and NNX (`_nnx`,
`_nnx_layers`). Everything below them is framework-neutral.
"""
