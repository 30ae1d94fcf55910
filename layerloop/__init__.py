"""layerloop: synthesise layered-image training data, train on it, and improve it in a loop."""

__version__ = "0.1.0"
