"""mailgrid: what every service shares (settings, errors, bus, stubs, CLI)."""

__version__ = "0.1.0"
