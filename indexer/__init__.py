"""Bulk indexing of images, captions and image+caption units into Qdrant, and search over the result."""
