"""Generated stubs of the `imgtxt.v1` wire contract (see `protos/imgtxt/v1/`)."""
