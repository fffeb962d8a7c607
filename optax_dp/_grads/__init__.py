"""The gradient builders users call in a train step: per-example gradients
(`_per_example`), book-keeping clipping (`_bookkeeping`) and
`clipped_grads` (`_clipped`).
"""
