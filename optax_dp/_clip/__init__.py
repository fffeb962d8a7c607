"""Clipping, framework-neutral: what a clip norm may be (`_clip_norms`), the
per-example arithmetic (`_clipping`), the book-keeping layer rules
(`_layer_rules`) and how `dp_aggregate` clips (`_clip_policy`). Knows no
framework. Imports only `_core`.
"""
