"""End-to-end tests: real clients and servers in network namespaces (need root)."""
