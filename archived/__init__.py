"""archived: turns archive jobs into signed, checksummed BagIt archives."""

__version__ = "0.1.0"
