"""Dataset loaders and their shared parts; import the public API from `sim.data.datasets`.

`sim.data.datasets` imports every loader module here, which is what registers them, so code that
loads data by name should go through it rather than through `sim.data.core` directly.
"""
