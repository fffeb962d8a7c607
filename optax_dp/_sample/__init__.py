"""Sampling and accounting: which examples form each batch (`_batches`,
`_sampling`) and what those batches cost in epsilon (`_accounting`). Imports
only `_core`.
"""
