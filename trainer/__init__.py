"""Training of the image and text towers (the only package that imports torch)."""
