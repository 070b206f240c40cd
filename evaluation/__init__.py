"""`imgtxt eval`: the standard R@K protocol over a bundle, a checkpoint or the index, with one metrics module."""
