"""netcarve: interpret convolutional networks by pruning them."""

__version__ = "0.1.0"
