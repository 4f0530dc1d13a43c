"""The runtime shim embedded in shipped apps: pick, verify, refit and load a bundle's engine on this machine."""
__version__ = "0.1.0"
