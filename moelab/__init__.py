"""moelab: build Mixture-of-Experts models from dense fine-tunes, then probe, evaluate, compare and publish them."""

__version__ = "0.1.0"
