"""Vector stores: the contract (`base`), the embedded Qdrant engine (`edge`), Qdrant servers (`client`), the factory."""
