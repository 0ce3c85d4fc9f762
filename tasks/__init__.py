"""The doit task graph: one module per stage. No jax or iree imports at module
level, so that loading the graph (every `doit` call) stays fast."""
