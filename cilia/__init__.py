"""cilia: Cilium's model of network security, in Python."""

__version__ = "0.1.0"
