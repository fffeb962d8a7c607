"""Ground floor: validators and refusals (`_checks`), noise keys (`_keys`),
the optax wrappers refused around the DP step (`_composition`), mesh
primitives (`_devices`). Imports nothing else of optax_dp.
"""
