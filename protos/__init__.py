"""Wire contracts: .proto sources and their generated Python stubs."""
