"""Reports the commands produce from trained models and codecs: the codec upper bound and prediction overlays.

They run models and read results, so they sit at the command level (docs/architecture.md#layers).
"""
