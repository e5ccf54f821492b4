"""GPU kernels of srdrl, installed as ``srdrl.kernels``."""
