"""Search over an index: encode a query with one tower, one nearest-neighbour look-up among one kind of points."""
