"""Shared package of the image–text retrieval system: wire stubs, model bundle, preprocessing, config, CLI.

Everything imports `imgtxt`; `imgtxt` imports nothing else of ours and never imports torch.
"""

__version__ = "0.1.0"
